"""One conversion, end to end, on every rank: resolve -> plan -> exchange -> write -> commit.

Everything before the first byte moves is metadata only and deterministic, so every rank
reaches the same plan (and the same error) on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import dist as rdist
from .errors import SourceError
from .exchange import run_exchange
from .formats import hf, torch_dist
from .formats.megatron_args import common_state
from .layout import Layout
from .models import table_for
from .plan import Piece, Plan, build_plan, check_coverage
from .progress import Progress, Stats
from .spec import ModelSpec, check_preset
from .staging import check_target, commit, discard, staging_dir

log = logging.getLogger("reshard")

SOURCE_FORMATS = {"hf": hf}
REPORT = "reshard_report.json"
TRACKER = "latest_checkpointed_iteration.txt"


@dataclass
class Job:
    """A resolved conversion: everything the data phase needs."""

    source: str
    target: str
    spec: ModelSpec
    layout: Layout
    index: object
    plan: Plan
    common: dict
    extra_keys: List[str]
    iteration: Optional[int]


def detect_format(path: str, fmt: str):
    if not os.path.exists(path):
        raise SourceError(f"source {path} does not exist; set source.path to a checkpoint directory")
    if not os.path.isdir(path):
        raise SourceError(f"source {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"source {path} is not readable (permission denied)")
    if fmt != "auto":
        return SOURCE_FORMATS[fmt]
    for mod in SOURCE_FORMATS.values():
        if mod.detect(path):
            return mod
    raise SourceError(f"cannot tell the format of {path}: expected config.json with model.safetensors "
                      "or model.safetensors.index.json (Hugging Face); set source.format to say which")


def preset_spec(model_cfg) -> Optional[ModelSpec]:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(model_cfg, resolve=True)
    if not d or d.get("name") is None:
        return None
    return ModelSpec.from_dict({k: v for k, v in d.items() if v is not None or k == "name"})


def check_source(index, table, spec: ModelSpec) -> None:
    """Every source tensor known, every needed one present, every shape as the spec says."""
    wanted = table.canonical_names(spec)
    present = set(index.shapes)
    missing = sorted(set(wanted) - present)
    unknown = sorted(n for n in present - set(wanted) if not table.is_dropped(n))
    bad_shapes = []
    for name in sorted(present & set(wanted)):
        entry, role, _ = wanted[name]
        exp = entry.part_shape(spec, role)
        if tuple(index.shapes[name]) != exp:
            bad_shapes.append(f"{name}: checkpoint {tuple(index.shapes[name])}, config implies {exp}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the architecture needs are absent: {_few(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) this architecture does not have (refusing to drop them "
                        f"silently): {_few(unknown)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape(s) disagree with the config: {_few(bad_shapes)}")
    if problems:
        raise SourceError(f"source {index.root} does not match its architecture ({spec.model_type}, "
                          f"{spec.num_layers} layers):\n  - " + "\n  - ".join(problems))


def _few(xs, n=10):
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n} more)" if len(xs) > n else "")


def resolve(cfg, world: int) -> Job:
    """Metadata only: detect, index, check, plan. Same result on every rank."""
    src, tgt = os.path.abspath(cfg.source.path), os.path.abspath(cfg.target.path)
    fmt = detect_format(src, cfg.source.format)
    index = fmt.read_index(src)
    spec = index.spec
    preset = preset_spec(cfg.model)
    if preset is not None:
        spec = check_preset(preset, spec, src)
        index.spec = spec
    p = cfg.parallel
    layout = Layout(tp=p.target_tp, pp=p.target_pp, vpp=p.target_vpp, ep=p.target_ep, etp=p.target_etp,
                    first_stage_layers=p.target_first_stage_layers, last_stage_layers=p.target_last_stage_layers,
                    make_vocab_size_divisible_by=p.make_vocab_size_divisible_by)
    layout.check(spec)
    table = table_for(spec)
    check_source(index, table, spec)
    check_target(tgt, src, cfg.overwrite)
    cast = getattr(torch, cfg.target.dtype) if cfg.target.dtype else None
    dtype_of = (lambda name: cast) if cast else (lambda name: index.dtypes[name])
    tgts = torch_dist.targets(spec, layout, table, dtype_of)
    writers_of = torch_dist.layout_writers(spec, layout, world) if cfg.io.assign == "layout" else None
    plan = build_plan(index, tgts, world, buffer_bytes=int(cfg.io.buffer_mb * 2**20),
                      max_piece_bytes=int(cfg.io.max_piece_mb * 2**20) if cfg.io.max_piece_mb else None,
                      writers_of=writers_of)
    problems = check_coverage(plan)
    assert not problems, problems
    main_dtype = tgts[0].dtype if tgts else torch.float32
    common = common_state(spec, layout, main_dtype, "torch_dist", cfg.target.iteration,
                          cfg.target.transformer_impl, {"format": index.format, "path": src})
    return Job(src, tgt, spec, layout, index, plan, common,
               torch_dist.extra_state_keys(spec, table), cfg.target.iteration)


def _iteration_dir(iteration: Optional[int]) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


class PieceSource:
    """Where this rank gets the bytes of a piece: received in the exchange, read from the
    source, or - for bytes that pass unchanged - a file span the writer copies in the kernel."""

    def __init__(self, reader, stats: Stats, kernel_copy: bool, device: torch.device):
        self.reader, self.stats, self.kernel_copy, self.device = reader, stats, kernel_copy, device
        self.held: Dict[int, torch.Tensor] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def read(self, p: Piece, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The piece in the target dtype; on ``device=cuda`` it lives (and is cast) on the GPU."""
        t = self.reader.read(p.stored, p.s_off, p.size, into=into)
        self.stats["bytes_read"] += p.src_nbytes
        if self.device.type == "cuda":  # through pinned memory: an asynchronous copy, and `into` is free at once
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t if t.dtype == p.dtype else t.to(p.dtype)

    def _read_into_scratch(self, p: Piece) -> torch.Tensor:
        # A piece read while writing is written before the next is read: one growing scratch
        # buffer serves them all, so its pages are faulted in once, not once per piece.
        if self._scratch.numel() < p.src_nbytes:
            self._scratch = torch.empty(p.src_nbytes, dtype=torch.uint8)
        return self.read(p, into=self._scratch)

    def payload(self, p: Piece):
        """The piece in its target shape, or a :class:`torch_dist.FileSpan`."""
        if p.id in self.held:
            t = self.held.pop(p.id)
        else:
            span = self.reader.span(p.stored, p.s_off, p.size)
            if span is not None and self.kernel_copy and p.repeat == 1 and p.dtype == p.stored.dtype:
                self.stats["bytes_read"] += p.src_nbytes
                return torch_dist.FileSpan(*span, p.dtype, p.dst_size, lambda: self.read(p).reshape(p.dst_size))
            t = self._read_into_scratch(p)
        if p.repeat > 1:
            t = t.expand(p.repeat, *t.shape[1:])
        return t.reshape(p.dst_size)


def execute(job: Job, cfg, rank: int, world: int, stats: Stats) -> dict:
    """The data phase and the commit. Collective; on any rank's failure nothing is committed."""
    run_id = rdist.broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None)
    stage = staging_dir(job.target, run_id)
    err, report = None, None
    try:
        report = _write_staged(job, cfg, rank, world, stats, os.path.join(stage, _iteration_dir(job.iteration)))
        if rank == 0:
            with stats.phase("commit"):
                _finish(stage, job, report)
                commit(stage, job.target)
    except Exception as e:  # every rank must still take part in the verdict below
        err = e
    if err is not None and rank == 0:
        discard(stage)
    if not rdist.agreed(err):  # a failure agreed on inside the data phase needs no second vote
        rdist.agree(err, "writing the target")
    if err is not None:
        raise err
    return report


def _write_staged(job: Job, cfg, rank: int, world: int, stats: Stats, ckpt_dir: str) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    source = PieceSource(SOURCE_FORMATS[job.index.format].Reader(job.source), stats, cfg.io.kernel_copy, device)
    mine = job.plan.written_by(rank)
    progress = Progress(sum(p.out_nbytes * p.repeat for p in mine), "rank 0 writing", cfg.io.progress,
                        enabled=rank == 0)
    err = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir)
        except OSError as e:
            err = e
    rdist.agree(err, "creating the staging directory")
    with stats.phase("exchange"):
        source.held = run_exchange(job.plan, rank, source.read, device, stats.counters)

    def wrote(n: int, kernel_copied: int) -> None:
        stats["bytes_written"] += n
        stats["bytes_kernel_copied"] += kernel_copied
        progress.update(n)

    try:
        with stats.phase("write"):
            torch_dist.write(ckpt_dir, rank, world, mine, job.plan.targets, source.payload, job.extra_keys,
                             job.common, cfg.io.fsync, wrote, fast=cfg.io.kernel_copy)
    finally:
        progress.close()
        source.reader.close()
    return _report(job, cfg, rdist.gather_objects(stats.as_dict()), world)


def _report(job: Job, cfg, per_rank: List[dict], world: int) -> dict:
    planned = job.plan.rank_stats()
    for r, (got, pl) in enumerate(zip(per_rank, planned)):
        got["rank"] = r
        got["planned"] = {k: v for k, v in pl.items() if k != "files"}
        got["files_opened"] = pl["files"]
    return {
        "source": {"path": job.source, "format": job.index.format, "bytes": job.index.total_bytes},
        "target": {"path": job.target, "format": cfg.target.format, "iteration": job.iteration},
        "spec": job.spec.to_dict(),
        "layout": job.common["reshard"]["layout"],
        "world_size": world,
        "pieces": len(job.plan.pieces),
        "rounds": job.plan.num_rounds,
        "buffer_bytes": job.plan.buffer_bytes,
        "ranks": per_rank,
        "totals": {k: sum(r[k] for r in per_rank) for k in
                   ("bytes_read", "bytes_sent", "bytes_received", "bytes_written", "bytes_kernel_copied")},
    }


def _finish(stage: str, job: Job, report: dict) -> None:
    with open(os.path.join(stage, TRACKER), "w") as f:
        f.write("release" if job.iteration is None else str(job.iteration))
    with open(os.path.join(stage, REPORT), "w") as f:
        json.dump(report, f, indent=2, default=str)


def convert(cfg) -> dict:
    """Run one conversion under the current process group (initialising it if needed)."""
    env = rdist.init(cfg.device)
    rank, world = rdist.rank(), rdist.world()
    stats = Stats()
    t0 = time.perf_counter()
    err = None
    with stats.phase("plan"):
        try:
            job = resolve(cfg, world)
        except Exception as e:  # every rank fails the same way; agree() keeps them in step
            err = e
    rdist.agree(err, "planning")
    if rank == 0:
        log.info("%s -> %s: %s, %d layers, source %.3f GB in %d files; target torch_dist tp=%d pp=%d vpp=%s "
                 "on %d rank(s) (%s); %d pieces, %d exchange round(s)", job.source, job.target,
                 job.spec.model_type, job.spec.num_layers, job.index.total_bytes / 1e9, len(job.index.files),
                 job.layout.tp, job.layout.pp, job.layout.vpp, world, env.launcher, len(job.plan.pieces),
                 job.plan.num_rounds)
    report = execute(job, cfg, rank, world, stats)
    if rank == 0:
        t = report["totals"]
        log.info("wrote %s in %.2f s: read %.3f GB, exchanged %.3f GB, wrote %.3f GB; peak RSS per rank %s MB",
                 job.target, time.perf_counter() - t0, t["bytes_read"] / 1e9, t["bytes_sent"] / 1e9,
                 t["bytes_written"] / 1e9, [r["peak_rss_mb"] for r in report["ranks"]])
    return report
