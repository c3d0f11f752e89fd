"""One conversion, end to end, on every rank: resolve -> plan -> exchange -> write -> commit.

Everything before the first byte moves is metadata only and deterministic, so every rank
reaches the same plan (and the same error) on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import dist as rdist
from . import faults
from . import formats
from . import optim
from .errors import ConfigError, ReshardError, SourceError, TargetError, VerifyError, translate
from .exchange import run_exchange
from .formats.base import read_rect
from .formats.files import FileSpan
from .formats.target import Context
from .layout import Layout
from .models import table_for
from .plan import Plan, build_plan, check_coverage
from .progress import Progress, Stats
from .spec import ModelSpec, check_preset
from .signals import interrupts_deferred, stop_on_signals
from .staging import Claim, check_target, commit, discard, mark_staging, recover, staging_dir
from .types import Piece

log = logging.getLogger("reshard")

REPORT = "reshard_report.json"


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
    iteration: Optional[int]
    writer: object  # the target format's formats.target.Target
    dtype_of: object = None
    optimizer: Optional[dict] = None  # the source's optimizer state, when it is carried (reshard/optim.py)

    @property
    def names(self) -> List[str]:
        return carried_names(self.spec, self.index, self.optimizer)

    def translate(self, e: BaseException, what: str, rank: int, stage: str = "") -> BaseException:
        needed = sum(p.written_nbytes for p in self.plan.written_by(rank))
        return translate(e, what, rank, needed, stage, self.source)


def preset_spec(model_cfg) -> Optional[ModelSpec]:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(model_cfg, resolve=True)
    if not d or d.get("name") is None:
        return None
    return ModelSpec.from_dict({k: v for k, v in d.items() if v is not None or k == "name"})


def _layer_of(name: str):
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def check_source(index, table, spec: ModelSpec) -> None:
    """Every source tensor known, every needed one present, every shape as the spec says."""
    wanted = table.canonical_names(spec)
    present = set(index.shapes)
    missing = sorted(set(wanted) - present)
    # optimizer shadows are left in the index only when they are carried, and shadow wanted weights
    unknown = sorted(n for n in present - set(wanted) if not table.is_dropped(n)
                     and not (optim.is_shadow(n) and optim.split(n)[1] in wanted))
    bad_shapes = []
    for name in sorted(present & set(wanted)):
        entry, role, _ = wanted[name]
        exp = entry.part_shape(spec, role)
        if tuple(index.shapes[name]) != exp:
            bad_shapes.append(f"{name}: checkpoint {tuple(index.shapes[name])}, config implies {exp}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the architecture needs are absent: {_few(missing)}")
        experts = sorted({(wanted[n][2], wanted[n][0].expert) for n in missing if wanted[n][0].expert is not None})
        if experts:
            problems.append(f"missing experts ({len(experts)}): "
                            + _few([f"layer {i} expert {e}" for i, e in experts]))
    beyond = {n: i for n in unknown if (i := _layer_of(n)) is not None and i >= spec.num_layers}
    mtp = sorted(beyond)
    if mtp:
        layers = sorted(set(beyond.values()))
        problems.append(f"multi-token-prediction layer(s) {layers} (num_nextn_predict_layers={spec.mtp_layers}, "
                        f"{len(mtp)} tensors, e.g. {_few(mtp)}) are not converted by this version; refusing to drop "
                        "them silently (remove them from the source, or from its index, to convert the main model)")
        unknown = [n for n in unknown if n not in beyond]
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) this architecture does not have (refusing to drop them "
                        f"silently): {_few(unknown)}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape(s) disagree with the config: {_few(bad_shapes)}")
    unlisted = [f"{n} (in {f})" for f, names in sorted(index.unlisted.items()) for n in sorted(names)]
    if unlisted:
        problems.append(f"{len(unlisted)} stored tensor(s) the index does not name (refusing to drop them silently; "
                        f"fix the index or remove them): {_few(unlisted)}")
    not_float = [f"{n} ({str(index.dtypes[n]).replace('torch.', '')})" for n in sorted(present & set(wanted))
                 if n in index.dtypes and not index.dtypes[n].is_floating_point]
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) are not floating point in a floating-point model (a quantized "
                        f"or damaged checkpoint? reshard converts float weights only): {_few(not_float)}")
    if problems:
        raise SourceError(f"source {index.root} does not match its architecture ({spec.model_type}, "
                          f"{spec.num_layers} layers):\n  - " + "\n  - ".join(problems))


def _few(xs, n=10):
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n} more)" if len(xs) > n else "")


def resolve(cfg, world: int) -> Job:
    """Metadata only: detect, index, check, plan. Same result on every rank."""
    src, tgt = os.path.abspath(cfg.source.path), os.path.abspath(cfg.target.path)
    fmt = formats.detect(src, cfg.source.format)
    if cfg.source.iteration is not None and not fmt.ITERATIONS:
        raise ConfigError(f"source.iteration={cfg.source.iteration}: {src} is a {fmt.NAME} checkpoint, which has no "
                          "iterations (source.iteration selects iter_XXXXXXX/ of a Megatron checkpoint)")
    preset = preset_spec(cfg.model)
    index = fmt.read_index(src, cfg.source.iteration, preset.vocab_size if preset else cfg.model.vocab_size)
    spec = index.spec
    if preset is not None and index.guessed:  # what the source cannot record, the preset says
        spec = dataclasses.replace(spec, **{f: getattr(preset, f) for f in index.guessed})
    if preset is not None:
        spec = check_preset(preset, spec, src)
        index.spec = spec
    p = cfg.parallel
    layout = Layout(tp=p.target_tp, pp=p.target_pp, vpp=p.target_vpp, ep=p.target_ep, etp=p.target_etp,
                    first_stage_layers=p.target_first_stage_layers, last_stage_layers=p.target_last_stage_layers,
                    make_vocab_size_divisible_by=p.make_vocab_size_divisible_by)
    layout.check(spec)
    table = table_for(spec)
    opt = optimizer_state(index, cfg)
    rows = training_vocab_rows(index, layout, opt)
    if rows > spec.vocab_size:  # read again, the source's padding rows now data
        true_vocab = spec.vocab_size
        spec = dataclasses.replace(spec, vocab_size=rows)
        index = fmt.read_index(src, cfg.source.iteration, rows)
        index.spec = spec
        opt = optimizer_state(index, cfg)
        opt["true_vocab"] = true_vocab
        log.info("training state: vocab padding rows %d..%d of the source carried as they are (Megatron's softmax "
                 "runs over the padded vocab, so they are part of the model being trained)", true_vocab, rows - 1)
    if opt is not None:
        log.info("optimizer state carried: %s (%d tensors, %s), iteration %s", ", ".join(opt["kinds"]),
                 opt["tensors"], opt["sharding"], cfg.target.iteration)
        for w in opt.get("warnings", ()):
            log.warning("optimizer state: %s", w)
    check_source(index, table, spec)
    check_target(tgt, src, cfg.overwrite)
    cast = getattr(torch, cfg.target.dtype) if cfg.target.dtype else None

    def dtype_of(name: str) -> torch.dtype:  # optimizer state keeps its dtype (fp32) whatever the weights are cast to
        return cast if cast is not None and not optim.is_shadow(name) else index.dtypes[name]

    writer = formats.writer(cfg.target.format, Context(spec, layout, table, dtype_of, cfg, index, src, world, opt))
    writer.check()
    tgts = writer.tensors()
    plan = build_plan(index, tgts, world, buffer_bytes=int(cfg.io.buffer_mb * 2**20),
                      max_piece_bytes=int(cfg.io.max_piece_mb * 2**20) if cfg.io.max_piece_mb else None,
                      writers_of=writer.writers(tgts, world), read_by_writer=writer.read_by_writer)
    problems = check_coverage(plan, {n: index.shapes[n] for n in carried_names(spec, index, opt)})
    if problems:  # a planner bug, never an input problem: refuse to write anything
        raise VerifyError("the plan does not cover the conversion exactly:\n  - " + "\n  - ".join(problems[:20]))
    common = writer.common(tgts[0].dtype if tgts else torch.float32)
    return Job(src, tgt, spec, layout, index, plan, common, cfg.target.iteration, writer, dtype_of, opt)


def training_vocab_rows(index, layout: Layout, optimizer: Optional[dict]) -> int:
    """The vocab rows a training checkpoint carries: with its optimizer state (Megatron -> Megatron), the
    source's padding rows too, as far as the target's padded vocab has room - they are trained (Megatron's
    softmax runs over the padded vocab), so a run resumes exactly only with them. Otherwise the vocab."""
    v = index.spec.vocab_size
    if optimizer is None or not index.vocab_rows or index.spec.is_encoder:
        return v
    return max(v, min(index.vocab_rows, layout.padded_vocab(v)))


def carried_names(spec: ModelSpec, index, optimizer: Optional[dict]) -> List[str]:
    """Every canonical tensor a conversion carries: the weights, and the optimizer state's shadows."""
    names = sorted(table_for(spec).canonical_names(spec))
    return names + (sorted(optim.shadows(index.slices)) if optimizer else [])


# target formats that write the optimizer state (torch_dist fully_reshardable, legacy distrib_optim.pt)
OPTIMIZER_TARGETS = ("torch_dist", "megatron_legacy")


def optimizer_state(index, cfg) -> Optional[dict]:
    """Decide what happens to the source's optimizer state (``cfg.optimizer``): the state to carry, or
    None - then its shadows leave the index, and ``index.not_carried`` names it. Megatron -> Megatron
    with the state carried keeps the source's iteration (``target.iteration`` unset), so Megatron resumes
    the run instead of treating the output as a release."""
    opt, mode, fmt = index.optimizer, cfg.optimizer, cfg.target.format
    carried = None
    if mode == "keep":
        if opt is None:
            held = {k: v for k, v in index.not_carried.items() if "optimizer" in k}
            raise ConfigError("optimizer=keep: " + (
                f"the source's optimizer state ({', '.join(k + ': ' + v['where'] for k, v in held.items())}) is in a "
                "form this version does not decode (it reads Megatron-core's distributed optimizer: torch_dist "
                "fully_reshardable and dp_reshardable, legacy distrib_optim.pt); use optimizer=drop to convert "
                "the weights only" if held else "the source holds no optimizer state"))
        if fmt not in OPTIMIZER_TARGETS:
            raise ConfigError(f"optimizer=keep: target.format={fmt} does not carry optimizer state in this version "
                              f"(only {', '.join(OPTIMIZER_TARGETS)}); use optimizer=drop to convert the weights only")
    if opt is not None and mode != "drop" and fmt in OPTIMIZER_TARGETS:
        if opt["problems"]:
            raise SourceError(f"the optimizer state of {index.root} is incomplete (optimizer=drop converts the "
                              "weights only):\n  - " + "\n  - ".join(opt["problems"][:20]))
        carried = opt
        for kind in ("optimizer state", "distributed optimizer state"):
            index.not_carried.pop(kind, None)
        if opt.get("scheduler") is not None:
            index.not_carried.pop("learning-rate scheduler state", None)
        if cfg.target.iteration is None and index.iteration is not None:
            cfg.target.iteration = index.iteration
    if carried is None:
        for name in optim.shadows(list(index.slices)):
            del index.slices[name]
            index.shapes.pop(name, None)
            index.dtypes.pop(name, None)
    return carried


class PieceSource:
    """Where this rank gets the bytes of a piece: received in the exchange, read from the
    source, or - for bytes that pass unchanged - a file span the writer copies in the kernel."""

    def __init__(self, reader, stats: Stats, kernel_copy: bool, device: torch.device):
        self.reader, self.stats, self.kernel_copy, self.device = reader, stats, kernel_copy, device
        self.held: Dict[int, torch.Tensor] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def read(self, p: Piece, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The piece in the target dtype; on ``device=cuda`` it lives (and is cast) on the GPU."""
        if p.transform is not None:
            t = read_rect(self.reader, p.stored, p.s_off, p.size, p.transform)
        else:
            t = self.reader.read(p.stored, p.s_off, p.s_size, into=into).reshape(p.size)
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

    def payload(self, p: Piece, spans: bool = True):
        """The piece in its target shape, or (``spans``) a :class:`~reshard.formats.files.FileSpan`."""
        if p.id in self.held:
            t = self.held.pop(p.id)
        else:
            span = self.reader.span(p.stored, p.s_off, p.s_size) if spans and p.transform is None else None
            if span is not None and self.kernel_copy and p.repeat == 1 and p.dtype == p.stored.dtype:
                self.stats["bytes_read"] += p.src_nbytes
                return FileSpan(*span, p.dtype, p.dst_size, lambda: self.read(p).reshape(p.dst_size))
            t = self._read_into_scratch(p)
        if p.repeat > 1:
            t = t.expand(p.repeat, *t.shape[1:])
        return t.reshape(p.dst_size)


def execute(job: Job, cfg, rank: int, world: int, stats: Stats) -> dict:
    """Claim the target, write, verify, commit. Collective; on any rank's failure nothing is
    committed, this run's staging is removed and the claim released (a kill -9 leaves both to
    the next run, which removes them: :func:`staging.recover`)."""
    run_id = rdist.broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None, what="starting the run")
    stage = staging_dir(job.target, run_id)
    claim = Claim(job.target, run_id, cfg.io.stale_lock_s) if rank == 0 else None
    err, report, where, recovered = None, None, "claiming the target", []
    try:
        err0 = None
        if rank == 0:
            try:
                claim.acquire()
                recovered = recover(job.target)
                check_target(job.target, job.source, cfg.overwrite)  # again: the target may have changed
                _check_space(job, cfg)
                mark_staging(stage, claim.owner)
            except Exception as e:
                err0 = job.translate(e, where, rank, stage)
        rdist.agree(err0, "claiming the target")
        faults.point("claimed")
        where = "writing the target"
        out_dir = os.path.join(stage, job.writer.subdir)
        report = _write_staged(job, cfg, rank, world, stats, out_dir)
        if recovered:
            report["recovered"] = recovered  # what this run removed or completed of earlier runs
        if cfg.verify:
            where = "verifying the output"
            faults.point("verify")
            with stats.phase("verify"):
                report["verify"] = verify_output(job, cfg, out_dir)
        if rank == 0:
            where = "committing"
            with stats.phase("commit"):
                job.writer.finish(job, stage)
                with open(os.path.join(stage, REPORT), "w") as f:
                    json.dump(report, f, indent=2, default=str)
                if not claim.still_mine():
                    raise TargetError(f"the claim on {job.target} was taken over by another run while this one "
                                      f"was writing (its heartbeat stalled past io.stale_lock_s="
                                      f"{cfg.io.stale_lock_s:g}); nothing was committed")
                commit(stage, job.target, cfg.overwrite, cfg.io.commit)
            faults.point("committed")
    except Exception as e:  # every rank must still take part in the verdict below
        err = job.translate(e, where, rank, stage)
    finally:
        if rank == 0:
            with interrupts_deferred():
                discard(stage)  # gone already after a commit
                claim.release()
    if not rdist.agreed(err):  # a failure agreed on inside the data phase needs no second vote
        rdist.agree(err, where)
    if err is not None:
        raise err
    return report


def _check_space(job: Job, cfg) -> None:
    """Rank 0, before anything is written: the output must fit (the old target stays until the commit)."""
    parent = os.path.dirname(os.path.realpath(job.target))
    needed = sum(p.written_nbytes for p in job.plan.pieces)
    try:
        st = os.statvfs(parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise TargetError(f"not enough space for {job.target}: the output needs {needed} bytes, {free} are free on "
                          f"{parent}; nothing was written (free space or choose another target.path)")


def _write_staged(job: Job, cfg, rank: int, world: int, stats: Stats, ckpt_dir: str) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    source = PieceSource(formats.get(job.index.format).Reader(job.source), stats, cfg.io.kernel_copy, device)
    mine = job.plan.written_by(rank)
    progress = Progress(sum(p.written_nbytes for p in mine), "rank 0 writing", cfg.io.progress, enabled=rank == 0)
    err = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
        except OSError as e:
            err = e
    rdist.agree(err, "creating the staging directory")
    with stats.phase("exchange"):
        faults.point("exchange")
        source.held = run_exchange(job.plan, rank, source.read, device, stats.counters)

    def wrote(n: int, kernel_copied: int) -> None:
        stats.wrote(n, kernel_copied)
        progress.update(n)

    try:
        with stats.phase("write"):
            job.writer.write(job, ckpt_dir, rank, world, mine, source, wrote)
            err = None
            if rank == 0:
                try:
                    job.writer.side_files(job, ckpt_dir)
                except Exception as e:
                    err = job.translate(e, "writing the side files", rank, ckpt_dir)
            rdist.agree(err, "writing the side files")
    finally:
        progress.close()
        source.reader.close()
    return _report(job, cfg, rdist.gather_objects(stats.as_dict()), world)


def verify_output(job: Job, cfg, out_dir: str) -> dict:
    """Collective, after every rank wrote: checksums of every canonical tensor as read from the
    source and as re-read from the staged output (the files, not memory). Raises
    :class:`VerifyError` naming the tensors that differ; returns the figures for the report."""
    from .verify import index_checksums

    t0 = time.perf_counter()
    # _report's gather already ordered this after every rank's last write
    names = job.names
    want, n_src = index_checksums(job.index, formats.get(job.index.format).Reader, job.dtype_of, names)
    t1 = time.perf_counter()
    err, out_index = None, None
    out_fmt = formats.get(cfg.target.format)
    try:
        out_index = out_fmt.read_index(out_dir, None, job.spec.vocab_size)
    except ReshardError as e:
        err = VerifyError(f"the staged output cannot be read back as {cfg.target.format}: {e}")
    rdist.agree(err, "re-reading the staged output")
    t2 = time.perf_counter()
    got, n_out = index_checksums(out_index, out_fmt.Reader, None, [n for n in names if n in out_index.slices])
    bad = [n for n in names if want.get(n) != got.get(n)]
    if bad:
        missing = [n for n in bad if n not in got]
        raise VerifyError(f"{len(bad)} tensor(s) in the staged output differ from the source "
                          f"(checksums of the re-read files): {', '.join(bad[:10])}"
                          + (f" ... (+{len(bad) - 10} more)" if len(bad) > 10 else "")
                          + (f"; absent: {', '.join(missing[:10])}" if missing else "")
                          + "; nothing was committed")
    totals = rdist.gather_objects((n_src, n_out))
    return {"ok": True, "tensors": len(names), "source_bytes_reread": sum(a for a, _ in totals),
            "output_bytes_reread": sum(b for _, b in totals), "seconds": round(time.perf_counter() - t0, 3),
            "seconds_source": round(t1 - t0, 3), "seconds_output_index": round(t2 - t1, 3),
            "seconds_output": round(time.perf_counter() - t2, 3),
            "checksum": "sum_r u_k(r) * sum_v bits16[r,v] * w(v) mod P_k, w < 2^22, P = 2^31-1 and 1e9+7",
            "coverage": "every target element written once; every source element used"}


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
        # training state the source holds and this version does not convert (optimizer, RNG, ...)
        "not_carried": job.index.not_carried,
        "world_size": world,
        "pieces": len(job.plan.pieces),
        "rounds": job.plan.num_rounds,
        "buffer_bytes": job.plan.buffer_bytes,
        "ranks": per_rank,
        # seconds from the start of the first rank's process (or of launch.nproc) to the first byte written
        "first_byte_s": min((r["first_byte_s"] for r in per_rank if r.get("first_byte_s") is not None), default=None),
        "totals": {k: sum(r[k] for r in per_rank) for k in
                   ("bytes_read", "bytes_sent", "bytes_received", "bytes_written", "bytes_kernel_copied")},
    }


def convert(cfg) -> dict:
    """Run one conversion under the current process group (initialising it if needed)."""
    with stop_on_signals():
        return _convert(cfg)


def _convert(cfg) -> dict:
    env = rdist.init(cfg.device)
    rank, world = rdist.rank(), rdist.world()
    stats = Stats()
    t0 = time.perf_counter()
    err = None
    with stats.phase("plan"):
        try:
            job = resolve(cfg, cfg.dry_run_world or world if cfg.dry_run else world)
        except Exception as e:  # every rank fails the same way; agree() keeps them in step
            err = translate(e, "planning", rank)
    rdist.agree(err, "planning")
    faults.point("plan")
    if rank == 0:
        moe = (f" ep={job.layout.ep} etp={job.layout.expert_tp} ({job.spec.num_experts} experts)"
               if job.spec.is_moe else "")
        log.info("%s -> %s: %s, %d layers, source %s %.3f GB in %d files; target %s tp=%d pp=%d vpp=%s%s "
                 "on %d rank(s) (%s); %d pieces, %d exchange round(s)", job.source, job.target,
                 job.spec.model_type, job.spec.num_layers, job.index.format, job.index.total_bytes / 1e9,
                 len(job.index.files), cfg.target.format, job.layout.tp, job.layout.pp, job.layout.vpp, moe, world,
                 env.launcher, len(job.plan.pieces), job.plan.num_rounds)
    if rank == 0 and job.index.not_carried:
        from .report import not_carried_text

        nc = job.index.not_carried
        if job.optimizer:  # a training checkpoint resharded: what still cannot follow, and why
            log.warning("not carried: %s (per-rank state of the source's ranks, which do not map onto the target's "
                        "ranks; resume with Megatron-LM's --no-load-rng, which then seeds from --seed)",
                        not_carried_text(nc))
        else:
            log.warning("not carried: the source also holds %s; the output will not have them (optimizer=%s, "
                        "target.format=%s: a training run resumed from it starts a new optimizer; the optimizer "
                        "state is carried Megatron -> Megatron, torch_dist or megatron_legacy)",
                        not_carried_text(nc), cfg.optimizer, cfg.target.format)
    if cfg.dry_run:
        from . import dryrun

        rep = dryrun.report(job.plan, cfg.target.format not in ("torch_dist", "fsdp_dtensor"))
        rep.update(not_carried=job.index.not_carried,
                   source={"path": job.source, "format": job.index.format, "bytes": job.index.total_bytes},
                   target={"path": job.target, "format": cfg.target.format}, plan_seconds=stats.seconds["plan"])
        if rank == 0:
            log.info("dry run (nothing read, sent or written):\n%s", dryrun.format_text(rep))
        return rep
    report = execute(job, cfg, rank, world, stats)
    if rank == 0:
        t = report["totals"]
        log.info("wrote %s in %.2f s: read %.3f GB, exchanged %.3f GB, wrote %.3f GB; peak RSS per rank %s MB",
                 job.target, time.perf_counter() - t0, t["bytes_read"] / 1e9, t["bytes_sent"] / 1e9,
                 t["bytes_written"] / 1e9, [r["peak_rss_mb"] for r in report["ranks"]])
    return report
