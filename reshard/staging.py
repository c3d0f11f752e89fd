"""The target guard and atomic output (DESIGN.md "Atomic").

Everything a run keeps beside the target is a hidden sibling named after it::

    .<stem>.reshard-lock              the claim: one run at a time writes a target (owner record)
    .<stem>.reshard-staging-<id>/     the output being written (owner record inside)
    .<stem>.reshard-commit            the journal of an overwrite on a file system without
                                      renameat2(RENAME_EXCHANGE) (start-up recovery completes it)

``<stem>`` is the target's name, shortened with a hash when the suffixes would pass NAME_MAX.

The claim is an ``O_CREAT|O_EXCL`` file (atomic on local file systems, NFSv3+ and Lustre, so
it holds across the nodes of a shared file system) taken before any data moves and kept
fresh by a heartbeat. A claim whose owner is gone - its process no longer exists on this host
(pid and start time recorded), or its heartbeat is older than ``io.stale_lock_s`` for another
host - is broken by the next run, which also removes that run's staging and says so. The commit
never replaces a non-empty target unless ``overwrite=true``: a plain ``rename`` over an existing
directory fails unless it is empty (POSIX), and an overwrite swaps the two directories in one
``RENAME_EXCHANGE`` (or follows the journal), so a kill at any moment leaves either the old or
the new checkpoint at the target, never neither.
"""

from __future__ import annotations

import ctypes
import errno
import getpass
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from . import faults
from .errors import TargetError

log = logging.getLogger("reshard")

OWNER_FILE = ".reshard-owner.json"
NAME_MAX = 255
_SUFFIX_ROOM = 40  # ".reshard-staging-" + a 12-hex run id + "-old", with room to spare


def check_target(target: str, source: str, overwrite: bool) -> None:
    t, s = os.path.realpath(target), os.path.realpath(source)
    if t == s or s.startswith(t + os.sep) or t.startswith(s + os.sep):
        raise TargetError(f"target {target} overlaps the source {source}; write the conversion elsewhere")
    name = os.path.basename(t)
    if len(name.encode()) > NAME_MAX:
        raise TargetError(f"target name {name[:40]}... is {len(name.encode())} bytes long; file systems allow "
                          f"{NAME_MAX}: choose a shorter target.path")
    parent = os.path.dirname(t) or "."
    p = parent
    while not os.path.exists(p):  # the first existing ancestor must be a writable directory
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise TargetError(f"cannot create {target}: {p} is a file, not a directory; choose another target.path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise TargetError(f"cannot write into {p} (permission denied); choose another target.path")
    if os.path.lexists(t):
        if not os.path.isdir(t):
            raise TargetError(f"target {target} exists and is not a directory; remove it or choose another "
                              "target.path")
        if os.listdir(t) and not overwrite:
            raise TargetError(f"target {target} exists and is not empty; pass overwrite=true to replace it "
                              "or choose another target.path")


def stem(target: str) -> str:
    name = os.path.basename(os.path.realpath(target))
    if len(name.encode()) + 1 + _SUFFIX_ROOM <= NAME_MAX:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[:NAME_MAX - 1 - _SUFFIX_ROOM - 11].decode(errors="ignore") + "~" + digest


def sidecar(target: str, kind: str) -> str:
    t = os.path.realpath(target)
    return os.path.join(os.path.dirname(t), f".{stem(t)}.reshard-{kind}")


def staging_dir(target: str, run_id: str) -> str:
    return sidecar(target, f"staging-{run_id}")


def lock_path(target: str) -> str:
    return sidecar(target, "lock")


def journal_path(target: str) -> str:
    return sidecar(target, "commit")


def leftovers(target: str) -> List[str]:
    """Every sidecar of ``target`` that exists (lock, staging directories, journal)."""
    t = os.path.realpath(target)
    parent, prefix = os.path.dirname(t), f".{stem(t)}.reshard-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, n) for n in names if n.startswith(prefix))


# ------------------------------------------------------------------------- owners

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """The process start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Owner:
    """Who holds a claim or a staging directory, and how to tell whether it is still there."""

    run_id: str
    host: str = field(default_factory=socket.gethostname)
    boot_id: str = field(default_factory=_boot_id)
    pid: int = field(default_factory=os.getpid)
    start_ticks: Optional[int] = field(default_factory=lambda: _start_ticks(os.getpid()))
    job_id: Optional[str] = field(default_factory=lambda: os.environ.get("SLURM_JOB_ID"))
    user: str = field(default_factory=lambda: _user())
    started: float = field(default_factory=time.time)
    argv: List[str] = field(default_factory=lambda: list(sys.argv[1:])[:20])

    def describe(self) -> str:
        job = f", Slurm job {self.job_id}" if self.job_id else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{job}, user {self.user}, started {when}"

    def gone(self, heartbeat: Optional[float], stale_s: float) -> Optional[str]:
        """Why the owner is certainly gone, or None while it may be alive."""
        if self.host == socket.gethostname():
            if self.boot_id and self.boot_id != _boot_id():
                return "its host has rebooted since"
            ticks = _start_ticks(self.pid)
            if ticks is None:
                return f"process {self.pid} no longer exists"
            if self.start_ticks is not None and ticks != self.start_ticks:
                return f"process {self.pid} no longer exists (the pid belongs to another process now)"
            return None
        if heartbeat is not None and time.time() - heartbeat > stale_s:
            return f"its heartbeat stopped {time.time() - heartbeat:.0f} s ago (io.stale_lock_s={stale_s:g})"
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid says enough
        return str(os.getuid())


def _write_owner(path: str, owner: Owner, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, json.dumps(asdict(owner)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_owner(path: str) -> Optional[Owner]:
    """The owner record at ``path`` (a lock file, or a staging directory's owner file)."""
    if os.path.isdir(path):
        path = os.path.join(path, OWNER_FILE)
    try:
        with open(path) as f:
            d = json.load(f)
        return Owner(**{k: d[k] for k in Owner.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError):
        return None


def _mtime(path: str) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


# ------------------------------------------------------------------------- the claim

class Claim:
    """The exclusive claim of one run on one target, from before the first byte moves to after
    the commit (or the discard). Rank 0 holds it; a heartbeat thread keeps its mtime fresh."""

    def __init__(self, target: str, run_id: str, stale_s: float = 300.0):
        self.target, self.run_id, self.stale_s = os.path.realpath(target), run_id, stale_s
        self.path = lock_path(self.target)
        self.owner = Owner(run_id)
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self.held = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                _write_owner(self.path, self.owner, exclusive=True)
                break
            except FileExistsError:
                other = read_owner(self.path)
                why = self._why_stale(other)
                if why is None:
                    who = other.describe() if other else "a run whose claim is being written"
                    raise TargetError(
                        f"target {self.target} is being written by another reshard run ({who}); wait for it, "
                        "or choose another target.path (if that run is gone: reshard clean "
                        f"{self.target})") from None
                self._break(other, why)
        else:
            raise TargetError(f"could not claim {self.target}: its lock {self.path} keeps reappearing")
        self.held = True
        self._beat = threading.Thread(target=self._heartbeat, name="reshard-claim", daemon=True)
        self._beat.start()

    def _why_stale(self, other: Optional[Owner]) -> Optional[str]:
        beat = _mtime(self.path)
        if other is None:  # empty or half-written: its writer died at once, or is writing it now
            return "its record is unreadable and older than 60 s" if beat and time.time() - beat > 60 else None
        return other.gone(beat, self.stale_s)

    def _break(self, other: Optional[Owner], why: str) -> None:
        """Remove a stale lock - exactly the one judged stale, even if runs race to break it."""
        brk = self.path + ".break"
        try:
            fd = os.open(brk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        except FileExistsError:
            if (time.time() - (_mtime(brk) or time.time())) > 60:
                os.unlink(brk)  # its breaker died in the middle; the next attempt takes over
            return
        try:
            again = read_owner(self.path)
            if (again.run_id if again else None) == (other.run_id if other else None):
                os.unlink(self.path)
                who = other.describe() if other else "an unknown run"
                log.warning("removed the stale lock of %s on %s: %s", who, self.target, why)
        except FileNotFoundError:
            pass
        finally:
            os.unlink(brk)

    def _heartbeat(self) -> None:
        period = max(1.0, min(30.0, self.stale_s / 10))
        while not self._stop.wait(period):
            try:
                os.utime(self.path)
            except OSError:
                return

    def still_mine(self) -> bool:
        o = read_owner(self.path)
        return o is not None and o.run_id == self.run_id

    def release(self) -> None:
        self._stop.set()
        if self.held and self.still_mine():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.held = False


# ------------------------------------------------------------------------- stale output

def recover(target: str) -> List[str]:
    """Under the claim: finish an interrupted journal commit, then remove staging left by runs
    that are gone. Returns what was done, one line each (also logged)."""
    done = []
    t = os.path.realpath(target)
    jp = journal_path(t)
    if os.path.exists(jp):
        done.append(_finish_journal(t, jp))
    for path in leftovers(t):
        if path in (lock_path(t), lock_path(t) + ".break", jp):
            continue
        owner = read_owner(path)
        if owner is not None and owner.gone(None, 0) is None and owner.host == socket.gethostname():
            log.warning("kept %s: its owner (%s) is still running", path, owner.describe())
            continue
        who = f"left by {owner.describe()}" if owner else "left by an earlier run"
        _remove(path)
        done.append(f"removed stale staging {path} ({who})")
    for line in done:
        log.warning("%s", line)
    return done


def _finish_journal(t: str, jp: str) -> str:
    try:
        with open(jp) as f:
            j = json.load(f)
        old, new = j["old"], j["new"]
    except (OSError, ValueError, KeyError):
        os.unlink(jp)
        return f"removed an unreadable commit journal {jp}"
    if os.path.lexists(t):
        for p in (old, new):
            if os.path.lexists(p):
                _remove(p)
        line = f"completed an interrupted overwrite of {t} (the new checkpoint was already in place)"
    elif os.path.isdir(new):
        os.rename(new, t)
        if os.path.lexists(old):
            _remove(old)
        line = f"completed an interrupted overwrite of {t}: moved the verified new checkpoint into place"
    elif os.path.isdir(old):
        os.rename(old, t)
        line = f"rolled back an interrupted overwrite of {t}: the previous checkpoint is back in place"
    else:
        line = f"found an overwrite journal for {t} with neither checkpoint present"
    os.unlink(jp)
    return line


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def mark_staging(stage: str, owner: Owner) -> None:
    os.makedirs(stage)
    _write_owner(os.path.join(stage, OWNER_FILE), owner, exclusive=True)


def unmark_staging(stage: str) -> None:
    try:
        os.unlink(os.path.join(stage, OWNER_FILE))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------- the commit

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2); OSError(ENOSYS) where the C library has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(staging: str, target: str, overwrite: bool, mode: str = "auto") -> None:
    """Put ``staging`` at ``target``. Without ``overwrite`` only an absent or empty target is
    replaced (a plain rename fails on a non-empty directory); with it, the old checkpoint is
    swapped out in one step and removed afterwards. ``mode``: auto (RENAME_EXCHANGE where the
    file system has it, else the journal) or journal."""
    t = os.path.realpath(target)
    unmark_staging(staging)
    if not overwrite or not os.path.lexists(t):
        try:
            os.rename(staging, t)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise TargetError(f"target {target} appeared while this run was writing it; nothing of it was "
                                  "touched and this run's output was discarded (pass overwrite=true to replace "
                                  "it)") from None
            raise
        _fsync_dir(os.path.dirname(t))
        return
    if not os.path.isdir(t) or os.path.islink(t):
        raise TargetError(f"target {target} is not a directory; remove it or choose another target.path")
    if mode == "auto":
        faults.point("commit")
        try:
            _renameat2(staging, t, RENAME_EXCHANGE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
                raise
        else:  # the old checkpoint is now at the staging path; no moment without a checkpoint at t
            _fsync_dir(os.path.dirname(t))
            _remove(staging)
            return
    jp, old = journal_path(t), staging + "-old"
    with open(jp, "w") as f:
        json.dump({"target": t, "old": old, "new": staging}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(os.path.dirname(t))
    os.rename(t, old)
    faults.point("commit")
    os.rename(staging, t)
    _fsync_dir(os.path.dirname(t))
    _remove(old)
    os.unlink(jp)


def discard(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------- reshard clean

def clean(target: str, force: bool = False, stale_s: float = 300.0) -> List[str]:
    """``reshard clean <target>``: recover or remove everything a gone run left beside it."""
    t = os.path.realpath(target)
    claim = Claim(t, "clean", stale_s)
    if force and os.path.exists(claim.path):
        other = read_owner(claim.path)
        os.unlink(claim.path)
        log.warning("removed the lock of %s (--force)", other.describe() if other else "an unknown run")
    claim.acquire()
    try:
        return recover(t)
    finally:
        claim.release()


def main(argv) -> int:
    import argparse

    from .errors import ReshardError

    ap = argparse.ArgumentParser(prog="reshard clean", description="remove what interrupted runs left beside a "
                                 "target: their lock, staging directories, an unfinished overwrite")
    ap.add_argument("target")
    ap.add_argument("--force", action="store_true", help="also break a lock whose owner looks alive "
                    "(another host, fresh heartbeat): only when you know that run is gone")
    ap.add_argument("--stale-s", type=float, default=300.0, help="heartbeat age after which a run on another "
                    "host counts as gone (io.stale_lock_s)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        done = clean(a.target, a.force, a.stale_s)
    except ReshardError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not done:  # what was done is logged, one line each
        print(f"nothing to clean beside {a.target}")
    return 0
