"""The output machinery every format shares (issue 14): the exact checksum at memory speed, the
Sink, streamed torch.save, kernel copies in every format, byte-identity with torch.save, the
lazy DCP import and reshard's own launcher (real forked ranks)."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from reshard import config, verify
from reshard.formats import files
from reshard.run import convert
from reshard.synthetic import load_preset, write_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- the checksum

def _exact(t: torch.Tensor, c_off) -> tuple:
    """The checksum's definition in Python integers (no float, no int64 overflow possible)."""
    if t.dim() == 1:
        t, c_off = t.reshape(1, -1), (0,) + tuple(c_off)
    units, per = verify.units_of(t.contiguous())
    u = units.numpy().astype(object)
    w = verify.col_weights(np.arange(c_off[1] * per, c_off[1] * per + units.shape[1], dtype=np.int64)).astype(object)
    rows = u.dot(w)
    return tuple(sum(int(rows[i]) % p * (((c_off[0] + i) * m + c) % p + 1) for i in range(len(rows))) % p
                 for p, (m, c) in zip(verify.PRIMES, verify._ROW))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_the_blas_checksum_equals_its_integer_definition(dtype):
    g = torch.Generator().manual_seed(0)
    cols = 300 if dtype == torch.float32 else 70_000  # wider than one 2^16-unit block
    t = (torch.randn(23, cols, generator=g) * 100).to(dtype)
    assert verify.rect_checksum(t, None, (5, 11)) == _exact(t, (5, 11))
    v = torch.randn(999, generator=g).to(dtype)
    assert verify.rect_checksum(v, None, (17,)) == _exact(v, (17,))


def test_the_largest_partial_sums_stay_exact():
    t = torch.full((3, 1 << 16), -32768, dtype=torch.int16).view(torch.bfloat16)  # |unit| = 2^15 everywhere
    assert verify.rect_checksum(t, None, (0, 0)) == _exact(t, (0, 0))


def test_checksums_add_up_over_any_split_and_see_a_moved_or_flipped_element():
    t = torch.randn(40, 96).to(torch.bfloat16)
    whole = verify.rect_checksum(t, None, (0, 0))
    parts = [verify.rect_checksum(t[a:b, c:d], None, (a, c)) for a, b in ((0, 13), (13, 40)) for c, d in ((0, 50),
                                                                                                        (50, 96))]
    assert tuple(sum(x[k] for x in parts) % verify.PRIMES[k] for k in range(2)) == whole
    moved = t.clone()
    moved[[3, 4]] = moved[[4, 3]]
    flipped = t.clone()
    flipped.view(torch.int16)[7, 9] ^= 1
    assert verify.rect_checksum(moved, None, (0, 0)) != whole
    assert verify.rect_checksum(flipped, None, (0, 0)) != whole


# ------------------------------------------------------------------------- the Sink

def test_a_sink_writes_in_chunks_gathers_small_writes_and_copies_spans(tmp_path, monkeypatch):
    src = tmp_path / "src"
    data = os.urandom(300_000)
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        span = files.FileSpan(fd, 1000, 200_000, torch.uint8, (200_000,), None)
        for kernel in (True, False):
            monkeypatch.setitem(files.KERNEL_COPY, "ok", True)
            if not kernel:
                def refuse(*a):
                    raise OSError(errno.EXDEV, "cross-device")
                monkeypatch.setattr(os, "copy_file_range", refuse)
            out = tmp_path / f"out{kernel}"
            with files.Sink(str(out), chunk=4096) as sink:
                sink.write(b"head")
                sink.write(data[:100_000])  # a large write, in 4 KiB calls
                copied = sink.copy(span)
                sink.write(b"tail")
                assert sink.tell() == 4 + 100_000 + 200_000 + 4
            assert out.read_bytes() == b"head" + data[:100_000] + data[1000:201_000] + b"tail"
            assert copied == (200_000 if kernel else 0)
    finally:
        os.close(fd)


def test_streamed_torch_save_equals_torch_save_and_falls_back_when_payloads_are_not_handed_over(tmp_path,
                                                                                                 monkeypatch):
    g = torch.Generator().manual_seed(1)
    real = {"a": torch.randn(64, 33, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
            "empty": torch.empty(0, 4)}
    order = list(real)

    def obj(ts):
        return {"args": {"x": 1}, "model": dict(zip(order, ts)), "extra": None}

    want = io.BytesIO()
    with files.crc32(False):
        torch.save(obj([real[k] for k in order]), want)
    payloads = [files.Payload(real[k].dtype, tuple(real[k].shape), real[k].nbytes,
                              lambda s, k=k: files.write_tensor(s, real[k]) or 0) for k in order]
    path = str(tmp_path / "f.pt")
    with files.Sink(path) as sink:
        with files.crc32(False):
            assert files.save_streamed(obj, payloads, sink) == 0
    assert open(path, "rb").read() == want.getvalue()
    monkeypatch.setattr(files, "address", lambda buf: -1)  # no payload is ever recognised
    with files.Sink(path) as sink:
        sink.write(b"x" * 10)
        with files.crc32(False):
            assert files.save_streamed(obj, payloads, sink) is None
        assert sink.tell() == 10  # truncated back to where it started
    assert os.path.getsize(path) == 10


# ------------------------------------------------------------------------- the formats

@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("writers")
    write_hf(str(d / "hf"), load_preset("tiny_llama3"), torch.bfloat16, shards=3)
    return str(d / "hf")


def _run(src, dst, *extra):
    return convert(config.compose([f"source.path={src}", f"target.path={dst}", "io.progress=none",
                                   f"paths.root={os.path.dirname(dst)}", *extra]))


def _crc_masked(raw: bytes) -> bytes:
    """A zip file with every CRC32 field (local headers, data descriptors, central directory) and
    what torch derives from them zeroed."""
    b, z = bytearray(raw), zipfile.ZipFile(io.BytesIO(raw))
    for info in z.infolist():
        h = info.header_offset
        assert b[h:h + 4] == b"PK\x03\x04"
        b[h + 14:h + 18] = bytes(4)
        n, m = struct.unpack("<HH", b[h + 26:h + 30])
        end = h + 30 + n + m + info.compress_size
        if info.filename.endswith(".data/serialization_id"):  # its second 20 digits: torch's digest of the CRCs
            b[end - 20:end] = bytes(20)
        if info.flag_bits & 0x08:  # a data descriptor after the data holds the CRC too
            end += 4 if b[end:end + 4] == b"PK\x07\x08" else 0
            b[end:end + 4] = bytes(4)
    pos = z.start_dir
    for _ in z.infolist():
        assert b[pos:pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", b[pos + 28:pos + 34])
        b[pos + 16:pos + 20] = bytes(4)
        pos += 46 + n + m + k
    return bytes(b)


@pytest.mark.parametrize("fmt,extra", [("megatron_legacy", ["parallel.target_tp=2", "parallel.target_pp=2"]),
                                       ("meta", ["target.meta_shards=2"])])
def test_streamed_torch_save_files_equal_torch_saves_own_but_for_the_crc(hf_src, tmp_path, fmt, extra):
    """io.crc32=true saves the real tensors with torch.save's defaults (CRCs that unzip accepts);
    the default streams them (kernel copies, one tensor in memory) and must give the very same
    bytes but for the CRC fields, which are 0 - what torch.save writes with set_crc32_options(False)."""
    outs = {}
    for crc in (False, True):
        outs[crc] = tmp_path / f"{fmt}{crc}"
        _run(hf_src, str(outs[crc]), f"target.format={fmt}", f"io.crc32={str(crc).lower()}", *extra)
    names = sorted(os.path.relpath(os.path.join(r, f), outs[True]) for r, _, fs in os.walk(outs[True]) for f in fs
                   if f.endswith((".pt", ".pth")))
    assert len(names) == (4 if fmt == "megatron_legacy" else 2)
    for rel in names:
        streamed, saved = (outs[False] / rel).read_bytes(), (outs[True] / rel).read_bytes()
        assert zipfile.ZipFile(io.BytesIO(saved)).testzip() is None  # real CRCs
        assert {i.CRC for i in zipfile.ZipFile(io.BytesIO(streamed)).infolist()} == {0}
        assert len(streamed) == len(saved) and _crc_masked(streamed) == _crc_masked(saved), rel
        a, b = torch.load(io.BytesIO(streamed), weights_only=False), torch.load(io.BytesIO(saved), weights_only=False)
        model = a["model"] if fmt == "megatron_legacy" else a
        ref = b["model"] if fmt == "megatron_legacy" else b
        assert model.keys() == ref.keys()
        assert all(torch.equal(model[k], ref[k]) for k in model if isinstance(model[k], torch.Tensor))


def test_unchanged_bytes_go_file_to_file_in_hf_and_legacy_targets(hf_src, tmp_path):
    hf = _run(hf_src, str(tmp_path / "hf"), "target.format=hf")
    t = hf["totals"]
    assert t["bytes_kernel_copied"] == t["bytes_written"] > 0  # HF -> HF: every tensor unchanged
    legacy = _run(hf_src, str(tmp_path / "lg"), "target.format=megatron_legacy")
    t = legacy["totals"]
    # TP=1: q/k/v rows land as whole runs of the fused qkv, gate/up of [gate; up]; only vocab padding is built
    assert 0.5 * t["bytes_written"] < t["bytes_kernel_copied"] <= t["bytes_written"]
    back = _run(str(tmp_path / "lg"), str(tmp_path / "hf2"), "target.format=hf")
    assert back["verify"]["ok"] and back["totals"]["bytes_kernel_copied"] > 0.3 * back["totals"]["bytes_written"]
    assert hf["first_byte_s"] > 0 and all(r["first_byte_s"] is not None for r in hf["ranks"])


def test_a_job_that_does_not_write_torch_dist_never_imports_dcp(hf_src, tmp_path):
    """torch.distributed.checkpoint (and the DTensor/sympy it pulls in) costs ~1 s per process:
    reading a torch_dist source needs only its .metadata stand-ins."""
    td = tmp_path / "td"
    _run(hf_src, str(td), "parallel.target_tp=2")
    code = (f"import sys; sys.path.insert(0, {REPO!r}); from reshard import config; from reshard.run import convert;"
            f"r = convert(config.compose(['source.path={td}', 'target.path={tmp_path}/hf', 'target.format=hf',"
            f" 'io.progress=none', 'paths.root={tmp_path}'])); assert r['verify']['ok'];"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------- launch.nproc

def _launch(src, dst, n, *extra, env=None):
    cmd = [sys.executable, "-m", "reshard", f"launch.nproc={n}", f"source.path={src}", f"target.path={dst}",
           "io.progress=none", f"paths.root={os.path.dirname(dst)}",
           "hydra.run.dir=" + os.path.join(os.path.dirname(dst), "hydra"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, **(env or {})))


def test_launch_nproc_starts_its_own_ranks(hf_src, tmp_path):
    out = tmp_path / "out"
    p = _launch(hf_src, str(out), 3, "parallel.target_tp=4", "parallel.target_pp=2")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "reshard_report.json").read_text())
    assert rep["world_size"] == 3 and rep["verify"]["ok"]
    assert sorted(r["rank"] for r in rep["ranks"]) == [0, 1, 2]
    assert all(r["bytes_written"] > 0 for r in rep["ranks"])
    assert "(launch.nproc)" in p.stderr + p.stdout


def test_launch_nproc_fails_as_one_job_when_a_forked_rank_fails(hf_src, tmp_path):
    out = tmp_path / "out"
    p = _launch(hf_src, str(out), 2, "target.format=hf", env={"RESHARD_FAULT": "write:raise:1"})
    assert p.returncode != 0
    assert "nothing was committed" in p.stderr + p.stdout
    assert not out.exists() and not list(tmp_path.glob(".out.reshard-*"))


def test_launch_nproc_refuses_to_run_under_another_launcher(hf_src, tmp_path):
    p = _launch(hf_src, str(tmp_path / "out"), 2, env={"RANK": "0", "WORLD_SIZE": "1"})
    assert p.returncode != 0 and "launch.nproc starts its own ranks" in p.stderr


def test_a_rank_that_dies_before_the_rendezvous_does_not_leave_the_job_hanging(hf_src, tmp_path):
    """Rank 0 then waits in TCPStore's C++ for a peer that will never come, where no Python signal
    handler runs: the launcher kills it after 2 x launch.grace_s and says why."""
    import time

    out = tmp_path / "out"
    t = time.monotonic()
    p = _launch(hf_src, str(out), 2, "launch.grace_s=1", env={"RESHARD_FAULT": "start:kill:1"})
    assert p.returncode == 137 and time.monotonic() - t < 60
    assert "rank(s) [1] failed and rank(s) [0] did not stop" in p.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.reshard-*"))
