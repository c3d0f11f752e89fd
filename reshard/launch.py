"""``python -m reshard launch.nproc=N ...``: N ranks on this node, started by reshard itself.

torchrun starts an agent that imports torch, then N fresh interpreters that each import torch
and reshard again (about 1.5 s each on a small VM, more on a busy login node). Here the one
interpreter imports what every rank needs, then forks N-1 copies of itself - before any thread,
process group or tensor exists, so the children start clean - and each process becomes one rank
of a ``tcp://127.0.0.1`` rendezvous (``RANK``/``WORLD_SIZE``/``MASTER_*`` set as torchrun sets
them, so the rest of reshard cannot tell the difference). Rank 0 is the parent; it waits for
every child and exits with the worst status. A child that dies is a lost peer for the others
(every rank fails with one line, nothing is committed); a parent that dies takes the
rendezvous with it. torchrun and srun stay supported for multi-node jobs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from typing import List, Optional, Tuple

_NPROC = re.compile(r"^\+{0,2}launch\.nproc=(\d+)$")


def requested(argv: List[str]) -> Optional[int]:
    """The N of a ``launch.nproc=N`` override, or None."""
    n = None
    for a in argv:
        m = _NPROC.match(a)
        if m:
            n = int(m.group(1))
    return n


def _preload(argv: List[str]) -> None:
    """What every rank imports, imported once before the fork (the DCP writer only for torch_dist)."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    from . import run  # noqa: F401
    from .formats import files, hf, megatron_legacy, meta, torch_dist  # noqa: F401
    fmt = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("target.format=")), "torch_dist")
    if fmt == "torch_dist":
        from .formats import dcp_writer  # noqa: F401


def start(n: int, argv: List[str]) -> Tuple[int, List[int]]:
    """Fork into ``n`` ranks: returns ``(this process's rank, the children's pids)`` (pids on rank 0 only)."""
    from .progress import process_start

    if "RANK" in os.environ or ("SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        raise SystemExit("reshard: launch.nproc starts its own ranks; under torchrun or srun leave it at 1")
    os.environ.setdefault("RESHARD_LAUNCH_T0", repr(process_start()))
    _preload(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                      LOCAL_WORLD_SIZE=str(n), RESHARD_LAUNCHER="launch.nproc")
    sys.stdout.flush()
    sys.stderr.flush()
    children = []
    for r in range(1, n):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r))
            return r, []
        children.append(pid)
    os.environ.update(RANK="0", LOCAL_RANK="0")
    return 0, children


def wait(children: List[int], rc: int) -> int:
    """Rank 0: wait for every child; the worst exit status of all (a signal counts as 128+N)."""
    worst = rc
    for pid in children:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            continue
        code = os.waitstatus_to_exitcode(status)
        worst = max(worst, 128 - code if code < 0 else code)
    return worst


def stop(children: List[int]) -> None:
    """Rank 0 is going away early: its children follow."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
