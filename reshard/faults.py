"""Failpoints: named moments of a run where the fault-injection tests kill, stop or fail a rank.

Off unless ``RESHARD_FAULT`` is set (one environment lookup per point), so they cost nothing
in a real run. ``RESHARD_FAULT=<point>:<action>[:<rank>][,...]``:

points   start (a rank began, before the rendezvous) · plan (planned, nothing claimed) · claimed (target claimed, no staging yet) · exchange ·
         write (a file half written) · fsync (before a file's fsync) · verify (output written,
         before the re-read) · commit (rank 0, between the commit's steps) · committed
actions  kill (SIGKILL itself) · term (SIGTERM itself) · raise (OSError) · enospc (OSError ENOSPC)
         · pause (touch ``$RESHARD_FAULT_DIR/paused.<rank>``, wait for ``$RESHARD_FAULT_DIR/resume``)
rank     only that rank (default: every rank)

Each point fires once per process.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_fired = set()


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def point(name: str) -> None:
    spec = os.environ.get("RESHARD_FAULT")
    if not spec or name in _fired:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if parts[0] != name or (len(parts) > 2 and parts[2] != "" and int(parts[2]) != _rank()):
            continue
        _fired.add(name)
        _act(name, parts[1] if len(parts) > 1 else "kill")


def _act(name: str, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # let the handler run at the next bytecode
    elif action == "raise":
        raise OSError(errno.EIO, f"injected failure at {name}")
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "pause":
        d = os.environ.get("RESHARD_FAULT_DIR", ".")
        with open(os.path.join(d, f"paused.{_rank()}"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(d, "resume")) and time.time() < deadline:
            time.sleep(0.02)
    else:
        raise ValueError(f"RESHARD_FAULT: unknown action {action!r}")
