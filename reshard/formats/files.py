"""Formats made of whole files, each written by one rank (Megatron legacy, HF safetensors,
Meta consolidated), and the output machinery every writer shares.

* which rank writes which file (:func:`file_owners`), and a file's tensors with their pieces
  (:func:`by_file`);
* :class:`Sink`: an output file written with ``pwrite`` calls of at most ``io.write_chunk_mb``
  (on some storage large calls into fresh page cache cost several times more per byte than
  small ones; parallel file systems want large requests - so it is an option), and
  ``copy_file_range`` for bytes that pass unchanged from a source file (:class:`FileSpan`):
  the kernel copies them, nothing is read into this process;
* :func:`emit_tensor`: one target tensor into a sink - its pieces in order when each is a run of
  the tensor's bytes (copied in the kernel where they are spans, written from the read or
  receive buffer otherwise), or assembled in one reused buffer when it is not (a TP merge of
  column blocks, a row permutation);
* :func:`save_streamed`: ``torch.save`` of an object whose tensors are placeholders that own no
  memory: as torch's zip writer hands each placeholder's payload to the file, the real bytes are
  emitted in its place, one tensor at a time.

A rank holds one tensor (plus what it received) at a time, never a whole file.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import faults
from ..types import Piece, TargetTensor, contiguous_run
from ..transforms import ROW_PERMUTATIONS


def file_owners(tgts: Sequence[TargetTensor], world: int) -> Dict[str, int]:
    """Files to ranks, largest first to the least-loaded rank (deterministic): every rank writes
    about the same bytes, and a file is never split between ranks."""
    size: Dict[str, int] = defaultdict(int)
    for t in tgts:
        size[t.file] += t.nbytes
    load = [0] * world
    owners = {}
    for f in sorted(size, key=lambda f: (-size[f], f)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[f] = r
        load[r] += size[f]
    return owners


def writers_by_file(tgts: Sequence[TargetTensor], world: int) -> Callable[[Piece, TargetTensor], Tuple[int, ...]]:
    owners = file_owners(tgts, world)
    return lambda piece, t: (owners[t.file],)


class _RecordingFile:
    """A file object for ``torch.save`` that keeps the exception of a failed write: torch's zip
    writer reports any failed write as ``unexpected pos`` and loses the cause (ENOSPC, EIO, or an
    error while emitting a streamed payload)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except Exception as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def torch_save(obj, f, path: str) -> None:
    """``torch.save(obj, f)``; a failed write raises its own exception (an OSError naming ``path``)."""
    rec = _RecordingFile(f)
    try:
        torch.save(obj, rec)
    except (OSError, RuntimeError) as e:
        cause = rec.error or (e if isinstance(e, OSError) else None)
        if cause is None:
            raise
        if not isinstance(cause, OSError):
            raise cause from None
        raise OSError(cause.errno, cause.strerror, cause.filename or path) from e


def name_file(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its file when the failing call did not say (a plain write())."""
    if e.filename is None:
        e.filename = path
    return e


def by_file(pieces: Sequence[Piece], tgts: Dict[str, TargetTensor]) -> List[Tuple[str, List[Tuple[TargetTensor,
                                                                                            List[Piece]]]]]:
    """This rank's files in name order, each with its tensors (in plan order) and their pieces."""
    files: Dict[str, Dict[str, List[Piece]]] = defaultdict(lambda: defaultdict(list))
    for p in pieces:
        files[tgts[p.key].file][p.key].append(p)
    return [(f, [(tgts[k], ps) for k, ps in files[f].items()]) for f in sorted(files)]


# ------------------------------------------------------------------------- the output file

@dataclass
class FileSpan:
    """A target piece whose bytes are exactly ``nbytes`` bytes of an open source file: the
    writer copies them file-to-file in the kernel (``copy_file_range``) instead of reading
    them into memory and writing them back. ``load`` reads them for real (the fallback)."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: Tuple[int, ...]
    load: Callable[[], torch.Tensor]


KERNEL_COPY = {"ok": hasattr(os, "copy_file_range")}
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM)
_SMALL = 64 << 10  # writes below this are gathered (zip headers, pickles) into one call


def address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.sync_file_range
        f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return f
    except (OSError, AttributeError):
        return None


_START_WRITEBACK = {"fn": _sync_file_range()}
WRITEBACK_EVERY = 64 << 20


class Sink:
    """One output file: ``pwrite`` calls of at most ``chunk`` bytes (small writes gathered),
    ``copy_file_range`` for :class:`FileSpan` bytes, and the file object ``torch.save`` needs
    (``write``, ``tell``, ``flush``, ``seek``, ``truncate``). Every OSError names the file.
    ``writeback`` (when the file will be fsynced): start the disk write as the file grows."""

    def __init__(self, path: str, chunk: int = 256 << 10, writeback: bool = False):
        self.name, self.chunk, self.early_writeback = path, max(4096, int(chunk)), writeback
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise name_file(e, path)
        self.pos, self.kernel_bytes = 0, 0
        self._small = bytearray()
        self._synced = 0  # bytes before this offset are already on their way to the disk

    def _pwrite(self, m: memoryview, at: int) -> None:
        done, n = 0, m.nbytes
        try:
            while done < n:
                k = os.pwrite(self.fd, m[done:done + self.chunk], at + done)
                if k <= 0:
                    raise OSError(errno.EIO, "short write")
                done += k
        except OSError as e:
            raise name_file(e, self.name)

    def _writeback(self) -> None:
        """Every ``WRITEBACK_EVERY`` bytes, start the disk write of what came before
        (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait): write-back overlaps
        the rest of the file, and the final fsync waits only for the tail."""
        fn = _START_WRITEBACK["fn"]
        done = self.pos - len(self._small)
        if fn is None or not self.early_writeback or done - self._synced < WRITEBACK_EVERY:
            return
        if fn(self.fd, self._synced, done - self._synced, 2) != 0:  # 2 = SYNC_FILE_RANGE_WRITE
            _START_WRITEBACK["fn"] = None  # not on this file system: fsync does it all
        self._synced = done

    def _drain(self) -> None:
        if self._small:
            self._pwrite(memoryview(self._small), self.pos - len(self._small))
            self._small = bytearray()

    def write(self, b) -> int:
        m = memoryview(b).cast("B")
        n = m.nbytes
        if n < _SMALL:
            self._small += m
            self.pos += n
            if len(self._small) >= self.chunk:
                self._drain()
            return n
        self._drain()
        self._pwrite(m, self.pos)
        self.pos += n
        self._writeback()
        return n

    def copy(self, span: FileSpan) -> int:
        """``span``'s bytes appended, by the kernel where it can; returns the bytes it copied."""
        self._drain()
        done = 0
        while done < span.nbytes and KERNEL_COPY["ok"]:
            try:
                n = os.copy_file_range(span.fd, self.fd, span.nbytes - done, span.offset + done, self.pos + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise name_file(e, self.name)
                KERNEL_COPY["ok"] = False  # e.g. across file systems: plain reads from now on
                break
            if n == 0:
                raise OSError(errno.EIO, "source file ended during copy (truncated while running?)", self.name)
            done += n
        kernel = done
        while done < span.nbytes:
            chunk = os.pread(span.fd, min(self.chunk, span.nbytes - done), span.offset + done)
            if not chunk:
                raise OSError(errno.EIO, "source file ended during copy (truncated while running?)", self.name)
            self._pwrite(memoryview(chunk), self.pos + done)
            done += len(chunk)
        self.pos += span.nbytes
        self.kernel_bytes += kernel
        self._writeback()
        return kernel

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._drain()
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def truncate(self) -> None:
        self._drain()
        os.ftruncate(self.fd, self.pos)

    def flush(self) -> None:
        self._drain()

    def fileno(self) -> int:
        return self.fd

    def sync(self, fsync: bool) -> None:
        """Everything written and, when asked, fsynced (the ``fsync`` failpoint sits just before)."""
        self._drain()
        if fsync:
            faults.point("fsync")
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise name_file(e, self.name)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._drain()
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------- tensors into a file

def write_tensor(sink: Sink, x: torch.Tensor) -> None:
    if x.numel():
        if x.device.type != "cpu":  # device=cuda: pieces live on the GPU until written
            x = x.cpu()
        sink.write(x.contiguous().reshape(-1).view(torch.uint8).numpy())


def row_runs(t: TargetTensor, pieces: Sequence[Piece]) -> Optional[List[Piece]]:
    """The pieces in file order when each is one run of ``t``'s bytes and together they tile it
    (whole rows, no row permutation); None when ``t`` must be assembled first."""
    if t.transform is not None:
        return None
    starts = []
    for p in pieces:
        run = contiguous_run(t.shape, tuple(p.dst_off), tuple(p.dst_size))
        if run is None:
            return None
        starts.append((run[0], run[1], p))
    starts.sort(key=lambda x: x[0])
    pos = 0
    for start, numel, _ in starts:
        if start != pos:
            return None
        pos += numel
    return [p for _, _, p in starts] if pos == math.prod(t.shape) else None


class Emitter:
    """Writes target tensors into sinks from their pieces. ``payload(piece, spans)`` gives the
    piece in its target shape and dtype, or (``spans``) a :class:`FileSpan` for bytes that pass
    unchanged. A tensor whose pieces are runs of it goes out piece by piece; any other is
    assembled in one buffer, reused for every tensor (its pages are faulted in once)."""

    def __init__(self, payload: Callable[[Piece, bool], object]):
        self.payload = payload
        self._buf = torch.empty(0, dtype=torch.uint8)

    def emit(self, sink: Sink, t: TargetTensor, pieces: Sequence[Piece]) -> int:
        """Writes ``t``; returns the bytes the kernel copied."""
        start, kernel = sink.tell(), 0
        runs = row_runs(t, pieces)
        if runs is not None:
            for p in runs:
                x = self.payload(p, True)
                if isinstance(x, FileSpan):
                    kernel += sink.copy(x)
                else:
                    assert x.dtype == t.dtype, (t.key, x.dtype, t.dtype)
                    write_tensor(sink, x)
                del x
        else:
            write_tensor(sink, self.build(t, pieces, reuse=True))
        assert sink.tell() - start == t.nbytes, f"{t.key}: wrote {sink.tell() - start} of {t.nbytes} bytes"
        return kernel

    def build(self, t: TargetTensor, pieces: Sequence[Piece], reuse: bool = False) -> torch.Tensor:
        """``t`` assembled in memory (in the reused buffer with ``reuse``: valid until the next call)."""
        n = t.nbytes
        if reuse:
            if self._buf.numel() < n:
                self._buf = torch.empty(n, dtype=torch.uint8)
            buf = self._buf[:n].view(t.dtype).reshape(t.shape)
        else:
            buf = torch.empty(t.shape, dtype=t.dtype)
        for p in pieces:
            idx = tuple(slice(o, o + s) for o, s in zip(p.dst_off, p.dst_size))
            src = self.payload(p, False)
            buf[idx] = src.reshape(p.dst_size) if tuple(src.shape) != tuple(p.dst_size) else src
            del src
        if t.transform is not None:
            buf = ROW_PERMUTATIONS[t.transform[0]](buf, t.transform[1])
        return buf


# ------------------------------------------------------------------------- torch.save, streamed

@dataclass
class Payload:
    """A tensor of a torch.save'd object whose bytes ``emit(sink)`` writes when their turn comes
    (exactly ``nbytes`` of them; it returns the bytes the kernel copied)."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    nbytes: int
    emit: Callable[[Sink], int]


def _reserve(nbytes: int):
    """Address space that is never touched, so never resident (MAP_NORESERVE: not even counted
    against the commit limit) - room for placeholders."""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=flags)


class _SwapStream:
    """The file object torch.save writes to: when a placeholder's payload comes by (its address,
    its size), the real bytes are emitted into the sink in its place."""

    def __init__(self, sink: Sink, swaps: Dict[int, Payload]):
        self.sink, self.swaps, self.kernel_bytes = sink, swaps, 0
        self.used: set = set()

    def write(self, b) -> int:
        m = memoryview(b).cast("B")
        ptr = address(m)
        p = self.swaps.get(ptr)
        if p is not None and m.nbytes == p.nbytes and ptr not in self.used:
            self.used.add(ptr)
            start = self.sink.tell()
            self.kernel_bytes += p.emit(self.sink)
            assert self.sink.tell() - start == p.nbytes
            return m.nbytes
        return self.sink.write(m)

    def flush(self):
        self.sink.flush()

    def __getattr__(self, name):
        return getattr(self.sink, name)


def save_streamed(make_obj: Callable[[List[torch.Tensor]], object], payloads: Sequence[Payload],
                  sink: Sink) -> Optional[int]:
    """``torch.save(make_obj(placeholders))`` into ``sink`` with each placeholder's bytes emitted
    by its :class:`Payload` as torch's writer reaches it. Returns the bytes the kernel copied, or
    None - the sink truncated back to where it started - if torch.save did not hand over every
    payload in one piece (then save the real tensors instead)."""
    sizes = [-(-p.nbytes // 64) * 64 for p in payloads]
    region = _reserve(sum(sizes))
    start = sink.tell()
    try:
        base = torch.frombuffer(region, dtype=torch.uint8)
        holders, swaps, off = [], {}, 0
        for p, size in zip(payloads, sizes):
            if p.nbytes == 0:
                holders.append(torch.empty(p.shape, dtype=p.dtype))
                continue
            sub = base.untyped_storage()[off:off + p.nbytes]
            h = torch.empty(0, dtype=p.dtype).set_(sub, 0, p.shape)
            swaps[h.data_ptr()] = p
            holders.append(h)
            off += size
        stream = _SwapStream(sink, swaps)
        torch_save(make_obj(holders), stream, sink.name)
        del holders, base, sub
        if len(stream.used) != len(swaps):
            sink.seek(start)
            sink.truncate()
            return None
        return stream.kernel_bytes
    finally:
        try:
            region.close()
        except BufferError:  # a placeholder still alive somewhere; the mapping goes with it
            pass


def exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a storage of exactly its own bytes: torch.save writes a tensor's whole storage,
    and pieces are often views into a larger read or receive buffer. No copy when contiguous."""
    if not t.is_contiguous():
        return t.contiguous()
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    sub = t.untyped_storage()[start:start + t.nbytes]
    return torch.empty(0, dtype=t.dtype).set_(sub, 0, t.shape)


def crc_config():
    """torch's serialization config when it can switch CRC32 off (torch >= 2.6), else None."""
    try:
        from torch.utils.serialization import config as cfg
    except ImportError:
        return None
    return cfg if hasattr(cfg.save, "compute_crc32") else None


@contextlib.contextmanager
def crc32(enabled: bool):
    """torch.save's zip CRC32 of every record on or off (torch's own option). Off, a record's
    bytes need not pass through this process at all; torch.load never checks the CRC (PyTorch
    builds miniz with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS, cmake/Dependencies.cmake), plain
    ``unzip -t`` would complain."""
    cfg = crc_config()
    if cfg is None:
        yield
        return
    old = cfg.save.compute_crc32
    cfg.save.compute_crc32 = enabled
    try:
        yield
    finally:
        cfg.save.compute_crc32 = old


class Syncer:
    """Files finished but not yet durable: each is fsynced (when asked) and closed by one
    background thread while the next file is written (``os.fsync`` releases the GIL, so the
    disk's write-back overlaps the next file's copy). :meth:`join` waits for all of them and
    raises the first failure, naming its file."""

    def __init__(self, fsync: bool):
        import queue
        import threading

        self.fsync, self.error = fsync, None
        self._q: "queue.Queue" = queue.Queue()
        self._t = threading.Thread(target=self._run, name="reshard-fsync", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            sink = self._q.get()
            if sink is None:
                return
            try:
                if self.error is None:
                    sink.sync(self.fsync)
            except BaseException as e:  # noqa: BLE001 - re-raised in join()
                self.error = self.error or e
            finally:
                try:
                    sink.close()
                except OSError as e:
                    self.error = self.error or name_file(e, sink.name)

    def submit(self, sink: "Sink") -> None:
        sink.flush()  # every byte handed to the kernel here, in this thread: failures belong to the writer
        if self.error is not None:
            raise self.error
        self._q.put(sink)

    def join(self) -> None:
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error
