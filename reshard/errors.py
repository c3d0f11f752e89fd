"""User-facing errors.

Every error a user can cause raises a subclass of :class:`ReshardError` whose message says
what went wrong, why, and what to do. ``assert`` is kept for internal invariants only.
"""

import errno
import os


class ReshardError(Exception):
    """Base class for errors caused by the input or the configuration."""


class SourceError(ReshardError):
    """The source checkpoint is missing, unreadable, incomplete or inconsistent."""


class ConfigError(ReshardError):
    """The configuration is invalid or disagrees with the checkpoint."""


class LayoutError(ConfigError):
    """The target layout does not divide the model."""


class TargetError(ReshardError):
    """The target cannot be written (exists, not writable, ...)."""


class UnsupportedError(ReshardError):
    """An architecture, tensor or format this version does not support."""


class PeerError(ReshardError):
    """Another rank failed; its own log holds the cause."""


class WriteError(ReshardError):
    """Writing the target failed on at least one rank; nothing was committed."""


class VerifyError(ReshardError):
    """What was written is not what was read: nothing is committed."""


class Interrupted(ReshardError):
    """The run was stopped by a signal (SIGTERM from Slurm or torchrun, Ctrl-C); nothing committed."""


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connection refused",
              "Socket Timeout", "Timed out waiting", "NCCL communicator was aborted", "ProcessGroupGloo")


def is_lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank went away (killed, crashed, stopped)."""
    if isinstance(e, PeerError) and getattr(e, "lost", False):
        return True
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch < 2.2
        DistError = ()
    if not isinstance(e, (RuntimeError, DistError)) or isinstance(e, ReshardError):
        return False
    msg = str(e)
    return isinstance(e, DistError) or any(s.lower() in msg.lower() for s in _LOST_PEER) or "gloo" in msg


def lost_peer(what: str, rank: int, e: BaseException) -> PeerError:
    msg = str(e)
    first = next((s for s in _LOST_PEER if s.lower() in msg.lower()), None) or (
        msg.strip().splitlines()[0][-120:] if msg.strip() else type(e).__name__)
    err = PeerError(f"rank {rank} lost its connection to another rank during {what}: that rank stopped (killed, "
                    f"crashed or out of memory; its log says why); nothing was committed ({type(e).__name__}: {first})")
    err.lost = True
    return err


def space_error(e: OSError, rank: int, needed: int, path: str) -> "WriteError":
    """``No space left on device`` (or a quota) as one line: the file, the bytes needed and free."""
    free = None
    p = path
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p or ".")
        free = st.f_bavail * st.f_frsize
    except OSError:
        pass
    where = getattr(e, "filename", None) or path
    what = "Disk quota exceeded" if e.errno == errno.EDQUOT else "No space left on device"
    return WriteError(f"rank {rank}: {what} writing {where}: needed {needed} bytes for this rank's files, "
                      f"{free if free is not None else 'unknown'} free; nothing was committed (free space or "
                      "choose another target.path)")


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def translate(e: BaseException, what: str, rank: int, needed: int = 0, stage: str = "",
              source: str = "") -> BaseException:
    """Any failure as one :class:`ReshardError` line naming the rank, the file and the cause
    (the traceback goes to the rank's log, see ``__main__``): a lost peer, no space (with the
    bytes ``needed`` in ``stage``), an OSError (a source error when its file lies under
    ``source``). A failure the ranks already agreed on stays agreed on: no rank may vote on it
    twice (``reshard.dist.agree``)."""
    out = _translated(e, what, rank, needed, stage, source)
    if out is not e and getattr(e, "_reshard_agreed", False):
        out._reshard_agreed = True
    return out


def _translated(e, what, rank, needed, stage, source):
    if isinstance(e, ReshardError):
        return e
    if is_lost_peer(e):
        return lost_peer(what, rank, e)
    if is_no_space(e):
        return space_error(e, rank, needed, stage)
    if isinstance(e, OSError):
        f = str(e.filename or "")
        cls = SourceError if source and f.startswith(source) else WriteError
        out = cls(f"rank {rank}: {e.strerror or e}{': ' + f if f else ''} ({what}); nothing was committed")
        out.__cause__ = e
        return out
    return e
