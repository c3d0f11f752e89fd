"""Process-group set-up and the rank environment, in one place.

Works the same for ``python -m reshard`` (one process), ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and ``srun`` without torchrun
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, master from the node list).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .errors import Interrupted, PeerError, is_lost_peer, lost_peer


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str  # "torchrun" | "launch.nproc" (reshard's own) | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[03-05,9],gpu1`` -> ``node03``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_env(environ: Mapping[str, str] = os.environ) -> RankEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return RankEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                       int(environ.get("LOCAL_RANK", 0)), environ.get("MASTER_ADDR"),
                       int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else None,
                       environ.get("RESHARD_LAUNCHER", "torchrun"))
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
        job = int(environ.get("SLURM_JOB_ID", "0") or 0)
        return RankEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                       int(environ.get("SLURM_LOCALID", 0)),
                       environ.get("MASTER_ADDR") or first_slurm_host(nodes),
                       int(environ.get("MASTER_PORT") or 20000 + job % 20000), "slurm")
    return RankEnv(0, 1, 0, None, None, "single")


def before_init() -> None:
    """Call before ``torch.distributed.init_process_group`` (:func:`init` does).

    ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` as the default of ten
    functions when it is first imported, and DCP imports it (so do Megatron-core and everything
    that imports DCP). Imported after ``init_process_group``, those defaults hold the default
    group: ``destroy_process_group`` then leaves it, and its gloo worker threads, alive until
    interpreter shutdown, where a worker dropping its last finished collective needs the GIL,
    is ended by ``pthread_exit`` inside a C++ destructor, and aborts the process ("terminate
    called without an active exception", SIGABRT, after the job succeeded). Imported first,
    the defaults are ``None`` (the default group, looked up at call time). It costs 2 ms.
    """
    import torch.distributed.nn.functional  # noqa: F401


def gloo_threads() -> int:
    """Threads of gloo process groups alive in this process (Linux; 0 elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                n += f.read().strip() in ("pt_gloo_runloop", "gloo_tcp_loop")
        except OSError:
            pass
    return n


def init(device: str = "cpu", timeout_s: int = 1800) -> RankEnv:
    """Initialise the default process group once (multirun jobs reuse it)."""
    env = detect_env()
    if dist.is_initialized():
        return env
    before_init()
    backend = "nccl" if device == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ and local > 1:  # ranks sharing a node share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    if env.launcher == "single":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_method = f"tcp://127.0.0.1:{port}"
    elif env.launcher == "slurm":
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    else:
        init_method = "env://"
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.launcher == "launch.nproc":  # reshard's own ranks: rank 0 serves the socket the launcher opened
        fd = os.environ.pop("RESHARD_STORE_FD", None) if env.rank == 0 else None
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout=timeout,
                              master_listen_fd=int(fd) if fd else None)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
        return env
    dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    return env


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def agree(err: Optional[BaseException], what: str, group=None) -> None:
    """Collective verdict on ``what``: raises on every rank when any rank failed it (``err``).

    A rank that failed raises its own ``err``; the others raise :class:`PeerError` naming the
    failed rank and its cause, so no rank is left waiting in a collective that will never come
    and rank 0's one line says what happened wherever it happened. Either exception is marked
    (:func:`agreed`) so that callers further up do not hold a second vote on the same failure.
    A rank that lost a peer (or was interrupted) raises at once: there is nobody to vote with.
    ``group``: the ranks that vote (default: every rank); ranks are numbered within it.
    """
    if err is not None and (is_lost_peer(err) or isinstance(err, Interrupted)):
        err._reshard_agreed = True
        raise err
    failed = {rank(group): summary(err)} if err is not None else {}
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        try:
            dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=dev)
            bad = [torch.zeros(1, dtype=torch.int32, device=dev) for _ in range(dist.get_world_size(group))]
            dist.all_gather(bad, flag, group=group)
            if any(int(b) for b in bad):
                mine = summary(err) if err is not None else None
                failed = {r: m for r, m in enumerate(gather_objects(mine, group=group)) if m is not None}
        except Exception as e:
            if not is_lost_peer(e):
                raise
            raise lost_peer(what, rank(group), e) from None
    if failed:
        r0 = min(failed)
        more = f" (and rank(s) {sorted(failed)[1:]})" if len(failed) > 1 else ""
        e = err or PeerError(f"{what} failed on rank {r0}{more}: {failed[r0]}")
        e._reshard_agreed = True
        raise e


def summary(err: BaseException) -> str:
    """``Class: message`` of an error, as rank 0 repeats it for another rank."""
    return f"{type(err).__name__}: {err}"


def agreed(err: Optional[BaseException]) -> bool:
    """Did every rank already learn of this failure through :func:`agree`?"""
    return getattr(err, "_reshard_agreed", False)


@contextlib.contextmanager
def collective(what: str):
    """A collective whose failure because a peer went away is a :class:`PeerError` line."""
    try:
        yield
    except Exception as e:
        if not is_lost_peer(e) or isinstance(e, PeerError):
            raise
        raise lost_peer(what, rank(), e) from None


def broadcast_object(obj, src: int = 0, what: str = "a broadcast between ranks"):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    with collective(what):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, what: str = "a gather between ranks", group=None):
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    with collective(what):
        dist.all_gather_object(out, obj, group=group)
    return out


def map_shared(fn, items):
    """``[fn(x) for x in items]`` with the work shared out: rank r computes items r, r+N, ...,
    and every rank gets every result. A failure on any rank is raised on every rank."""
    items = list(items)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [fn(x) for x in items]
    r, n = rank(), world()
    mine, err = {}, None
    for i in range(r, len(items), n):
        try:
            mine[i] = fn(items[i])
        except Exception as e:  # sent to every rank, raised everywhere below
            err = e
            break
    results = {}
    errors = []
    for got, e in gather_objects((mine, err)):
        results.update(got)
        if e is not None:
            errors.append(e)
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]
