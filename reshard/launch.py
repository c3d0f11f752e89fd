"""``python -m reshard launch.nproc=N ...``: N ranks on this node, started by reshard itself.

torchrun starts an agent that imports torch, then N fresh interpreters that each import torch
and reshard again (about 1.5 s each on a small VM, more on a busy login node). Here the one
interpreter imports what every rank needs, then forks N copies of itself - before any thread,
process group or tensor exists, so the children start clean - and each child becomes one rank
of a ``tcp://127.0.0.1`` rendezvous (``RANK``/``WORLD_SIZE``/``MASTER_*`` set as torchrun sets
them, so the rest of reshard cannot tell the difference). The parent only supervises, as
torchrun's agent does: it forwards SIGTERM/SIGHUP to the ranks, and when a rank has died, the
others get ``grace_s`` to fail on their own (a dead peer is a lost peer in the next collective:
every rank fails with one line, nothing is committed), then SIGTERM, then SIGKILL - a rank can
be blocked in C++ where no signal handler runs (the rendezvous waiting for the dead rank). It
exits with the worst status of its ranks. torchrun and srun stay supported, and are the way to
run on several nodes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from typing import Dict, List, Optional

_NPROC = re.compile(r"^\+{0,2}launch\.nproc=(\d+)$")


def requested(argv: List[str]) -> Optional[int]:
    """The N of a ``launch.nproc=N`` override, or None."""
    n = None
    for a in argv:
        m = _NPROC.match(a)
        if m:
            n = int(m.group(1))
    return n


def grace(argv: List[str]) -> float:
    """``launch.grace_s`` (default 10): how long the ranks get to stop on their own once one died."""
    for a in reversed(argv):
        m = re.match(r"^\+{0,2}launch\.grace_s=([0-9.]+)$", a)
        if m:
            return float(m.group(1))
    return 10.0


def _preload(argv: List[str]) -> None:
    """What every rank imports, imported once before the fork (the DCP writer only for torch_dist)."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    from . import run  # noqa: F401
    from .formats import files, fsdp_dtensor, hf, megatron_legacy, meta, torch_dist  # noqa: F401
    fmt = next((a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("target.format=")), "torch_dist")
    if fmt in ("torch_dist", "fsdp_dtensor"):
        from .formats import dcp_writer  # noqa: F401


def start(n: int, argv: List[str], grace_s: float = 10.0) -> int:
    """Fork ``n`` ranks; returns this process's rank in each of them. The parent never returns:
    it supervises the ranks and exits with their worst status (a signal counts as 128+N)."""
    from .progress import process_start

    if "RANK" in os.environ or ("SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        raise SystemExit("reshard: launch.nproc starts its own ranks; under torchrun or srun leave it at 1")
    os.environ.setdefault("RESHARD_LAUNCH_T0", repr(process_start()))
    _preload(argv)
    # The rendezvous socket listens before any rank exists: a rank that is ready first queues in its
    # backlog instead of being refused and retrying with back-off (0.2-0.5 s here); rank 0's store
    # serves it (TCPStore's master_listen_fd, as torchrun's agent does).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n),
                      LOCAL_WORLD_SIZE=str(n), RESHARD_LAUNCHER="launch.nproc")
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for r in range(n):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(r), LOCAL_RANK=str(r))
            if r == 0:
                os.environ["RESHARD_STORE_FD"] = str(listener.detach())
            else:
                listener.close()
            return r
        pids.append(pid)
    listener.close()
    os._exit(_supervise(pids, grace_s))


def _supervise(pids: List[int], grace_s: float) -> int:
    import time

    status: Dict[int, int] = {}
    forward = lambda sig, _frame: _signal(pids, status, sig)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank of the process group itself
    died, stage = None, 0
    while len(status) < len(pids):
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            code = os.waitstatus_to_exitcode(st)
            status[pid] = 128 - code if code < 0 else code
            if status[pid] and died is None:
                died = time.monotonic()
            continue
        if died is not None and time.monotonic() - died > grace_s * (stage + 1) and stage < 2:
            if stage == 1:
                alive = sorted(pids.index(p) for p in pids if p not in status)
                sys.stderr.write(f"reshard: rank(s) {sorted(pids.index(p) for p, x in status.items() if x)} failed and "
                                 f"rank(s) {alive} did not stop {2 * grace_s:g} s later (blocked waiting for them): "
                                 "killing them; nothing was committed\n")
                sys.stderr.flush()
            _signal(pids, status, signal.SIGTERM if stage == 0 else signal.SIGKILL)
            stage += 1
        time.sleep(0.02)
    return max(status.values(), default=1)


def _signal(pids: List[int], status: Dict[int, int], sig: int) -> None:
    for pid in pids:
        if pid not in status:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
