"""Fault injection: real processes killed, stopped and starved at chosen moments, per target format.

Every case asserts the same contract: nothing is committed (or the previous target is intact),
nothing is lost, whatever the failed run left is removed by the next run (which says so), and the
re-run's output is verified. Kills are real ``SIGKILL``s of a rank under torchrun, fired from
reshard's failpoints (``reshard/faults.py``); the totals are printed at the end of the session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_json
from reshard.staging import leftovers
from reshard.synthetic import load_preset, write_hf

FORMATS = ("torch_dist", "megatron_legacy", "hf", "meta")
KILL_POINTS = ("plan", "claimed", "exchange", "write", "fsync", "verify", "commit")
TOTALS: dict = {}


def _count(kind: str, **kv) -> None:
    t = TOTALS.setdefault(kind, {})
    for k, v in kv.items():
        t[k] = t.get(k, 0) + int(v)


def fault_totals() -> list:
    """Lines for the terminal summary (conftest)."""
    out = []
    for kind, t in TOTALS.items():
        out.append(f"{kind}: " + ", ".join(f"{v} {k}" for k, v in t.items()))
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_hf(str(root / "hf"), load_preset("tiny_llama3"), shards=3)
    return str(root / "hf")


# every rank writes files in every format (so a failpoint on any rank fires)
LAYOUT = {"torch_dist": ["parallel.target_tp=2", "parallel.target_pp=2"],
          "megatron_legacy": ["parallel.target_tp=2", "parallel.target_pp=2"],
          "hf": ["target.max_shard_size=200KB"], "meta": ["target.meta_shards=2"]}


def _overrides(src, target, fmt, *extra, root=None):
    return [f"source.path={src}", f"target.path={target}", f"target.format={fmt}", "io.progress=none",
            f"paths.root={root or os.path.dirname(target)}", *LAYOUT[fmt], *extra]


def _env(fault=None, fault_dir=None):
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    e.pop("RESHARD_FAULT", None)
    if fault:
        e["RESHARD_FAULT"] = fault
    if fault_dir:
        e["RESHARD_FAULT_DIR"] = str(fault_dir)
    return e


def _cmd(nproc, overrides):
    if nproc == 1:
        return [sys.executable, "-m", "reshard", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "reshard", *overrides]


def _run(nproc, overrides, fault=None, timeout=240):
    return subprocess.run(_cmd(nproc, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=_env(fault), cwd=REPO)


def _committed(target) -> bool:
    return os.path.isfile(os.path.join(target, "reshard_report.json"))


def _verified(target) -> bool:
    rep = read_json(os.path.join(target, "reshard_report.json"))
    return bool(rep.get("verify", {}).get("ok"))


def _rerun_clean_and_verified(src, target, fmt, left_before, *extra, root=None):
    """The next run: succeeds, verifies, says what it removed, and leaves nothing beside the target."""
    p = _run(1, _overrides(src, target, fmt, *extra, root=root))
    assert p.returncode == 0, p.stdout[-3000:]
    assert _committed(target) and _verified(target)
    assert leftovers(target) == [], leftovers(target)
    if left_before:
        assert "removed stale staging" in p.stdout or "removed the stale lock" in p.stdout or \
            "interrupted overwrite" in p.stdout, p.stdout[-3000:]
    return p


def _no_reshard_traceback(text: str) -> None:
    """Failures are one line: no traceback through reshard's code on the console."""
    frames = [ln for ln in text.splitlines() if ln.lstrip().startswith("File ")]
    assert not [f for f in frames if os.path.join(REPO, "reshard") + os.sep in f], text[-4000:]


# ---------------------------------------------------------------- kill -9 at every moment

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_commits_nothing_and_the_next_run_cleans_up(tmp_path, src, fmt, point):
    target = str(tmp_path / "out")
    extra = []
    before = None
    if point == "commit":  # between the steps of an overwrite: the previous checkpoint must survive
        extra = ["overwrite=true", "io.commit=journal" if fmt in ("hf", "meta") else "io.commit=auto"]
        assert _run(1, _overrides(src, target, fmt)).returncode == 0
        before = read_json(os.path.join(target, "reshard_report.json"))["source"]
    victim = 0 if point == "commit" else (KILL_POINTS.index(point) + FORMATS.index(fmt)) % 2
    p = _run(2, _overrides(src, target, fmt, *extra), fault=f"{point}:kill:{victim}")
    assert p.returncode != 0, p.stdout[-2000:]
    committed = _committed(target) and before is None
    assert not committed
    left = leftovers(target)
    if point == "commit" and os.path.exists(target):  # RENAME_EXCHANGE not yet done: the old one is intact
        assert read_json(os.path.join(target, "reshard_report.json"))["source"] == before
        ins = subprocess.run([sys.executable, "-m", "reshard", "inspect", target], capture_output=True, text=True,
                             env=_env(), cwd=REPO)
        assert "beside it" in ins.stdout and all(x in ins.stdout for x in left), ins.stdout[-2000:]
    if victim == 1:  # rank 0 saw its peer go, said so in one line, removed its own staging and claim
        assert left == [], left
        assert "[reshard][ERROR] - PeerError: rank 0 lost its connection" in p.stdout or \
            "[reshard][ERROR] - Interrupted: stopped by SIGTERM" in p.stdout, p.stdout[-3000:]
    _no_reshard_traceback(p.stdout)
    _rerun_clean_and_verified(src, target, fmt, bool(left), *extra)
    _count("kill -9", runs=1, committed=committed, **{"left something for the next run": bool(left)},
           **{"stale after the next run": 0, "re-runs verified": 1})


# ---------------------------------------------------------------- SIGTERM (Slurm time limit, torchrun)

def _paused(fault_dir, ranks, proc, timeout=120):
    t0 = time.time()
    while not all(os.path.exists(os.path.join(fault_dir, f"paused.{r}")) for r in ranks):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("fmt,nproc", [("torch_dist", 2), ("megatron_legacy", 2), ("hf", 2), ("meta", 1)])
def test_sigterm_discards_the_staging_at_once(tmp_path, src, fmt, nproc):
    target, fd = str(tmp_path / "out"), tmp_path / "fault"
    fd.mkdir()
    proc = subprocess.Popen(_cmd(nproc, _overrides(src, target, fmt)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env("write:pause", fd), cwd=REPO)
    _paused(fd, [0], proc)
    assert leftovers(target)  # the claim and the staging exist while it runs
    proc.send_signal(signal.SIGTERM)  # as Slurm does to the launcher at a time limit
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Interrupted: stopped by SIGTERM" in err and "nothing was committed" in err, err[-3000:]
    _no_reshard_traceback(err)
    assert not os.path.exists(target) and leftovers(target) == []
    _rerun_clean_and_verified(src, target, fmt, False)
    _count("SIGTERM", runs=1, committed=0, **{"staging left": 0, "re-runs verified": 1})


# ---------------------------------------------------------------- concurrent runs on one target

def test_concurrent_runs_commit_exactly_one(tmp_path, src):
    pairs, exactly_one = 10, 0
    for i in range(pairs):
        target = str(tmp_path / f"out{i}")
        fmt = FORMATS[i % len(FORMATS)]
        procs = [subprocess.Popen(_cmd(1, _overrides(src, target, fmt)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO) for _ in range(2)]
        outs = [p.communicate(timeout=240)[0] for p in procs]
        res = [(p.returncode, o) for p, o in zip(procs, outs)]
        ok = [rc == 0 for rc, _ in res]
        assert sum(ok) == 1, [e[-1500:] for _, e in res]
        loser = next(e for rc, e in res if rc != 0)
        assert "TargetError" in loser and any(s in loser for s in (
            "being written by another reshard run", "exists and is not empty", "appeared while this run")), loser
        assert _committed(target) and _verified(target) and leftovers(target) == []
        exactly_one += 1
    _count("concurrent", pairs=pairs, **{"exactly one committed": exactly_one})


def test_a_directory_appearing_at_the_target_mid_run_is_never_touched(tmp_path, src):
    target, fd = str(tmp_path / "out"), tmp_path / "fault"
    fd.mkdir()
    proc = subprocess.Popen(_cmd(2, _overrides(src, target, "torch_dist")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env("write:pause:0", fd), cwd=REPO)
    _paused(fd, [0], proc)
    os.makedirs(target)
    with open(os.path.join(target, "keep.txt"), "w") as f:
        f.write("mine")
    (fd / "resume").touch()
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "TargetError: target" in err and "appeared while this run was writing it" in err, err[-3000:]
    assert os.listdir(target) == ["keep.txt"] and open(os.path.join(target, "keep.txt")).read() == "mine"
    assert leftovers(target) == []
    _count("target appeared mid-run", runs=1, **{"kept intact": 1})


def test_a_live_claim_is_respected_and_a_dead_one_is_broken(tmp_path, src):
    from reshard.staging import Claim, lock_path

    target = str(tmp_path / "out")
    live = Claim(target, "live00000000")
    live.acquire()
    try:
        p = _run(1, _overrides(src, target, "hf"))
        assert p.returncode == 1 and "is being written by another reshard run" in p.stdout
        assert f"pid {os.getpid()}" in p.stdout and not os.path.exists(target)
    finally:
        live.release()
    assert not os.path.exists(lock_path(target))
    # a claim of a process that is gone: a child that exits at once
    child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from reshard.staging import Claim; Claim(sys.argv[2], 'dead00000000').acquire()",
                            REPO, target], check=True)
    assert child.returncode == 0 and os.path.exists(lock_path(target))
    p = _rerun_clean_and_verified(src, target, "hf", True)
    assert "removed the stale lock" in p.stdout and "no longer exists" in p.stdout


def test_a_claim_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    from reshard.staging import Claim, Owner, _write_owner, lock_path
    from reshard.errors import TargetError

    target = str(tmp_path / "out")
    other = Owner("remote000000", host="another-node", pid=1)
    _write_owner(lock_path(target), other, exclusive=True)
    with pytest.raises(TargetError, match="pid 1 on another-node"):
        Claim(target, "me0000000000", stale_s=60).acquire()
    old = time.time() - 120
    os.utime(lock_path(target), (old, old))
    c = Claim(target, "me0000000000", stale_s=60)
    c.acquire()  # the heartbeat is 120 s old: broken
    assert c.still_mine()
    c.release()
    assert not os.path.exists(lock_path(target))


# ---------------------------------------------------------------- the journal, every state

@pytest.mark.parametrize("state,expect", [
    ("before_first_rename", "old"),   # journal written, nothing renamed: the old target stays
    ("between_renames", "new"),       # old moved aside, new not yet in place: roll forward (it was verified)
    ("after_second_rename", "new"),   # both renamed, old not yet removed
    ("new_lost", "old"),              # only the old one is left: roll back
])
def test_start_up_recovery_completes_or_rolls_back_an_overwrite(tmp_path, state, expect):
    from reshard.staging import journal_path, recover, staging_dir

    target = str(tmp_path / "out")
    new, old = staging_dir(target, "abc"), staging_dir(target, "abc") + "-old"
    for d, tag in ((target, "old"), (new, "new")):
        os.makedirs(d)
        open(os.path.join(d, "tag"), "w").write(tag)
    with open(journal_path(target), "w") as f:
        json.dump({"target": target, "old": old, "new": new}, f)
    if state in ("between_renames", "after_second_rename", "new_lost"):
        os.rename(target, old)
    if state == "after_second_rename":
        os.rename(new, target)
    if state == "new_lost":
        import shutil

        shutil.rmtree(new)
    done = recover(target)
    assert done and open(os.path.join(target, "tag")).read() == expect
    assert leftovers(target) == []


def test_reshard_clean_removes_what_a_killed_run_left(tmp_path, src):
    target = str(tmp_path / "out")
    p = _run(1, _overrides(src, target, "hf"), fault="write:kill")
    assert p.returncode != 0 and len(leftovers(target)) == 2  # its claim and its staging
    c = subprocess.run([sys.executable, "-m", "reshard", "clean", target], capture_output=True, text=True,
                       env=_env(), cwd=REPO)
    assert c.returncode == 0, c.stderr
    assert "removed stale staging" in c.stderr and "removed the stale lock" in c.stderr
    assert leftovers(target) == [] and not os.path.exists(target)
    c = subprocess.run([sys.executable, "-m", "reshard", "clean", target], capture_output=True, text=True,
                       env=_env(), cwd=REPO)
    assert c.returncode == 0 and "nothing to clean" in c.stdout


# ---------------------------------------------------------------- disk full (a small tmpfs)

@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full cases run in CI as root)")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = []

    def mount(size_kb: int) -> str:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(1)
        return str(mnt)

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full_is_one_line_and_commits_nothing(tmp_path, src, tmpfs, fmt):
    # before anything is written: the output does not fit
    mnt, root = tmpfs(400), str(tmp_path / "logs")
    target = os.path.join(mnt, "out")
    p = _run(1, _overrides(src, target, fmt, root=root))
    assert p.returncode == 1 and "TargetError: not enough space for" in p.stdout, p.stdout[-2000:]
    assert "the output needs" in p.stdout and "nothing was written" in p.stdout
    assert os.listdir(mnt) == []
    # while writing: the disk fills up after the check (another job's files)
    mnt = tmpfs(2048)
    target, fd = os.path.join(mnt, "out"), tmp_path / "fault"
    fd.mkdir()
    nproc = 2 if fmt in ("torch_dist", "megatron_legacy") else 1
    proc = subprocess.Popen(_cmd(nproc, _overrides(src, target, fmt, root=root)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env("claimed:pause", fd), cwd=REPO)
    _paused(fd, range(nproc), proc)
    filler = os.path.join(mnt, "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1k", "count=1750"], capture_output=True)
    (fd / "resume").touch()
    err, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "WriteError: rank" in err and "No space left on device writing" in err and "needed" in err \
        and "free; nothing was committed" in err, err[-3000:]
    _no_reshard_traceback(err)
    assert sorted(os.listdir(mnt)) == ["filler"], os.listdir(mnt)
    os.remove(filler)
    _rerun_clean_and_verified(src, target, fmt, False, root=root)
    _count("disk full", runs=2, committed=0, **{"one-line errors": 2, "re-runs verified": 1})
