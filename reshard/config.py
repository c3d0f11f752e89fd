"""Structured configs: one dataclass schema per group, registered in Hydra's ConfigStore.

YAML files in ``conf/`` extend these schemas (``conf/model/*.yaml`` starts from
``model/schema``), so a typo in an override is an error, not a silently ignored key.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from . import optim
from .errors import ConfigError

SOURCE_FORMATS = ("auto", "hf", "fsdp_dtensor", "torch_dist", "megatron_legacy", "meta")  # formats.NAMES
TARGET_FORMATS = ("torch_dist", "megatron_legacy", "hf", "meta", "fsdp_dtensor")
PLANNED_TARGET_FORMATS = ()  # formats announced but not yet written (none at present)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PathsConfig:
    root: str = "${oc.env:RESHARD_ROOT,checkpoints}"
    # per-rank logs of ranks > 0 (rank 0 logs to the console and Hydra's output dir)
    log_dir: str = "${paths.root}/logs"


@dataclass
class SourceConfig:
    path: str = "${paths.root}/${model_dir:${model.name}}/hf"
    format: str = "auto"
    iteration: Optional[int] = None  # Megatron sources: null follows the tracker file

@dataclass
class TargetConfig:
    # a sibling of the source: <root>/<model>/hf -> <root>/<model>/torch_dist_tp8_pp1
    path: str = ("${dirname:${source.path}}/${target.format}"
                 "_tp${parallel.target_tp}_pp${parallel.target_pp}"
                 "${layout_suffix:${parallel.target_vpp},${parallel.target_ep}}")
    format: str = "torch_dist"
    dtype: Optional[str] = None  # null keeps the source dtype
    iteration: Optional[int] = None  # null writes release/, an int writes iter_XXXXXXX/
    transformer_impl: str = "transformer_engine"  # or "local" (module names in legacy files)
    # MoE into Megatron legacy: experts as TE grouped GEMM weights (linear_fc1.weight{j}) instead
    # of SequentialMLP modules (local_experts.{j}.linear_fc1.weight)
    moe_grouped_gemm: bool = False
    # hf: shard size; the file layout of an HF reference (default: the source when it is HF);
    # a folder whose tokenizer and other side files are copied (default: the source's own)
    max_shard_size: str = "auto"  # auto: 5GB, smaller when that would leave ranks without a file
    hf_reference: Optional[str] = None
    hf_side_files: Optional[str] = None
    meta_shards: int = 1  # meta: number of consolidated.NN.pth files


@dataclass
class ParallelConfig:
    target_tp: int = 1
    target_pp: int = 1
    target_vpp: Optional[int] = None
    target_ep: int = 1
    target_etp: Optional[int] = None
    target_first_stage_layers: Optional[int] = None
    target_last_stage_layers: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    # the data-parallel size of the run that resumes from a training checkpoint: needed only where the
    # layout of a written distrib_optim.pt depends on it (--overlap-grad-reduce without --ddp-bucket-size)
    target_dp: Optional[int] = None


@dataclass
class IOConfig:
    buffer_mb: float = 512  # exchange budget per rank and round
    max_piece_mb: Optional[float] = None  # default: min(buffer/2, source/(8 N))
    # auto: nothing moves between ranks - torch_dist chunks are written by their reader, whole files
    # (legacy, hf, meta) are read by their writer; layout: readers take contiguous runs of the
    # source and pieces go to the rank that owns their target shard (torch_dist: as the target
    # layout places it; whole files: the file's writer)
    assign: str = "auto"
    fsync: bool = True
    # copy bytes that pass unchanged file-to-file in the kernel (copy_file_range), never through
    # memory; false: read + write every byte
    kernel_copy: bool = True
    # the zip CRC32 of every torch.save record (legacy, Meta, torch_dist files); torch.load never
    # checks it, and computing it needs every byte in memory (no kernel copy, whole files assembled)
    crc32: bool = False
    # the largest single write() call; on some storage (VMs: fresh page cache) calls of >= 1 MiB
    # cost several times more per byte than 256 KiB ones, parallel file systems prefer large ones
    write_chunk_mb: float = 0.25
    progress: str = "auto"  # auto | bar | log | none
    # a claim (lock beside the target) of a run on another host whose heartbeat is older than this
    # counts as abandoned; on this host a claim is abandoned as soon as its process is gone
    stale_lock_s: float = 300
    # overwrite=true: auto swaps old and new in one renameat2(RENAME_EXCHANGE) where the file system
    # has it, else follows a journal that the next run (or reshard clean) completes; journal: always that
    commit: str = "auto"


@dataclass
class ModelConfig:
    """A preset (``+model=<name>``). All null when no preset is chosen."""

    name: Optional[str] = None
    model_type: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    qkv_bias: Optional[bool] = None
    sliding_window: Optional[int] = None
    dtype: Optional[str] = None
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_norm_topk_prob: Optional[bool] = None
    shared_expert_ffn_hidden_size: Optional[int] = None
    shared_expert_gate: Optional[bool] = None
    moe_expert_bias: Optional[bool] = None
    moe_router_score_function: Optional[str] = None
    dense_layers: Optional[List[int]] = None
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    mtp_layers: Optional[int] = None
    num_tokentypes: Optional[int] = None
    binary_head: Optional[bool] = None


@dataclass
class LaunchConfig:
    # python -m reshard launch.nproc=N: start N ranks on this node from one interpreter (imports
    # paid once, then the ranks are forked); under torchrun or srun leave it at 1
    nproc: int = 1
    # once a rank died, the others get this long to fail on their own, then SIGTERM, then as long
    # again before SIGKILL (a rank blocked in the rendezvous waiting for the dead one takes no signal)
    grace_s: float = 10.0


@dataclass
class ReshardConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    io: IOConfig = field(default_factory=IOConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    overwrite: bool = False
    # a training checkpoint's optimizer state (reshard/optim.py): auto carries it where this version can
    # (torch_dist fully_reshardable -> torch_dist) and names what it drops otherwise; keep refuses to drop
    # it; drop converts the weights only (and names what it drops)
    optimizer: str = "auto"
    # re-read the staged output and compare checksums of every canonical tensor with the source
    # (and check the plan's coverage) before the commit
    verify: bool = True
    # plan only: per rank bytes to read/send/receive/write, files, estimated memory, warnings
    dry_run: bool = False
    dry_run_world: Optional[int] = None  # plan for this many ranks (default: the ranks running)
    device: str = "cpu"  # cpu (gloo) or cuda (NCCL)
    log_level: str = "INFO"


def _model_dir(name: Optional[str]) -> str:
    return "UNSET_MODEL" if name in (None, "None") else str(name)


def _layout_suffix(vpp, ep) -> str:
    out = ""
    if vpp not in (None, "None"):
        out += f"_vpp{vpp}"
    if ep not in (None, "None", 1, "1"):
        out += f"_ep{ep}"
    return out


def register() -> None:
    resolvers = (("model_dir", _model_dir), ("layout_suffix", _layout_suffix),
                 ("dirname", lambda p: os.path.dirname(os.path.normpath(str(p)))))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    cs = ConfigStore.instance()
    cs.store(name="reshard_schema", node=ReshardConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="parallel", name="schema", node=ParallelConfig)


def validate(cfg) -> None:
    """Check what a schema cannot, all at once, naming the fields."""
    problems = []
    if "UNSET_MODEL" in str(cfg.source.path):
        problems.append("source.path is not set: pass source.path=<checkpoint dir>, or pick a preset "
                        "(+model=<name>) to use the conventional ${paths.root}/<model>/hf")
    if cfg.source.format not in SOURCE_FORMATS:
        problems.append(f"source.format={cfg.source.format!r}: supported {list(SOURCE_FORMATS)}")
    if cfg.target.format not in TARGET_FORMATS:
        later = " (planned, not in this version)" if cfg.target.format in PLANNED_TARGET_FORMATS else ""
        problems.append(f"target.format={cfg.target.format!r}{later}: supported {list(TARGET_FORMATS)}")
    if cfg.target.dtype is not None and cfg.target.dtype not in DTYPES:
        problems.append(f"target.dtype={cfg.target.dtype!r}: use one of {list(DTYPES)} or null")
    if cfg.target.transformer_impl not in ("transformer_engine", "local"):
        problems.append("target.transformer_impl must be 'transformer_engine' or 'local'")
    p = cfg.parallel
    if cfg.target.format in ("hf", "meta") and (p.target_tp, p.target_pp, p.target_vpp) != (1, 1, None):
        problems.append(f"parallel.target_tp/pp/vpp describe Megatron layouts; target.format={cfg.target.format} "
                        "has none (use target.meta_shards for Meta)")
    if cfg.target.meta_shards < 1:
        problems.append("target.meta_shards must be >= 1")
    if cfg.io.assign not in ("auto", "layout"):
        problems.append(f"io.assign={cfg.io.assign!r}: use auto or layout")
    if cfg.launch.nproc < 1:
        problems.append(f"launch.nproc={cfg.launch.nproc} must be >= 1")
    if cfg.io.write_chunk_mb <= 0:
        problems.append("io.write_chunk_mb must be > 0")
    if cfg.io.buffer_mb <= 0:
        problems.append("io.buffer_mb must be > 0")
    if cfg.io.max_piece_mb is not None and cfg.io.max_piece_mb <= 0:
        problems.append("io.max_piece_mb must be > 0 or null")
    if cfg.io.progress not in ("auto", "bar", "log", "none"):
        problems.append("io.progress must be auto, bar, log or none")
    if cfg.device not in ("cpu", "cuda"):
        problems.append(f"device={cfg.device!r}: use cpu or cuda")
    if cfg.target.format in ("hf", "meta") and (p.target_ep, p.target_etp) != (1, None):
        problems.append(f"parallel.target_ep/etp describe Megatron layouts; target.format={cfg.target.format} "
                        "has none")
    problems += _value_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _value_problems(cfg) -> list:
    """Values the types allow but a checkpoint cannot have."""
    out = []
    p, t, s = cfg.parallel, cfg.target, cfg.source
    for name in ("target_tp", "target_pp", "target_ep", "make_vocab_size_divisible_by"):
        if getattr(p, name) < 1:
            out.append(f"parallel.{name}={getattr(p, name)} must be >= 1")
    for name in ("target_vpp", "target_etp", "target_first_stage_layers", "target_last_stage_layers"):
        v = getattr(p, name)
        if v is not None and v < 1:
            out.append(f"parallel.{name}={v} must be >= 1 (or null)")
    if p.target_vpp is not None and p.target_pp == 1 and p.target_vpp > 1:
        out.append("parallel.target_vpp needs parallel.target_pp > 1 (virtual stages interleave pipeline stages)")
    if (p.target_first_stage_layers is not None or p.target_last_stage_layers is not None) and p.target_pp == 1:
        out.append("parallel.target_first/last_stage_layers need parallel.target_pp > 1")
    for name, v in (("target.iteration", t.iteration), ("source.iteration", s.iteration)):
        if v is not None and v < 0:
            out.append(f"{name}={v} must be >= 0 (or null for release/)")
    if t.format == "hf" and str(t.max_shard_size) != "auto":
        try:
            from .formats.hf import _parse_size

            if _parse_size(t.max_shard_size) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            out.append(f"target.max_shard_size={t.max_shard_size!r}: use auto, a byte count or a size such as "
                       "500MB, 5GB, 2GiB")
    for name, v in (("target.hf_reference", t.hf_reference), ("target.hf_side_files", t.hf_side_files)):
        if v is not None and not os.path.isdir(str(v)):
            out.append(f"{name}={v}: no such directory")
        elif v is not None and t.format not in ("hf", "meta"):
            out.append(f"{name} is used by target.format=hf (and meta); target.format={t.format} has no side files")
    if s.iteration is not None and s.format in ("hf", "meta"):
        out.append(f"source.iteration applies to Megatron sources; source.format={s.format} has no iterations")
    if cfg.io.stale_lock_s <= 0:
        out.append("io.stale_lock_s must be > 0")
    if cfg.io.commit not in ("auto", "journal"):
        out.append(f"io.commit={cfg.io.commit!r}: use auto or journal")
    if cfg.dry_run_world is not None and cfg.dry_run_world < 1:
        out.append("dry_run_world must be >= 1")
    if cfg.optimizer not in optim.MODES:
        out.append(f"optimizer={cfg.optimizer!r}: use auto, keep or drop")
    return out


CONF_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf"))


def compose(overrides=()):
    """The same config ``python -m reshard <overrides>`` would run, for Python callers and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
