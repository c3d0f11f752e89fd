"""``reshard inspect <dir>``: what is in a checkpoint of any supported format - metadata only.

Prints the format, architecture, layout, iteration, every stored tensor (name, shape, dtype,
bytes, file) and what is missing or inconsistent (absent ranks, shapes that do not tile, args
that disagree: whatever the format's reader refuses, with its reason). ``--json`` for scripts.
Nothing but headers, pickles' object trees (restricted unpickler) and DCP metadata is read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .errors import ReshardError
from .spec import ENCODER_TYPES
from .staging import leftovers


def inspect(path: str, fmt: str = "auto", vocab_size=None) -> dict:
    from . import formats

    path = os.path.abspath(path)
    mod = formats.detect(path, fmt)
    info = {"path": path, "format": mod.NAME, "problems": []}
    try:
        info["tensors"] = mod.stored(path)
    except ReshardError as e:
        info["tensors"] = []
        info["problems"].append(str(e))
    try:
        index = mod.read_index(path, None, vocab_size)
        info["architecture"] = index.spec.to_dict()
        lay = index.source_layout
        info["layout"] = None if lay is None else {k: getattr(lay, k) for k in (
            "tp", "pp", "vpp", "ep", "first_stage_layers", "last_stage_layers", "make_vocab_size_divisible_by")}
        info["iteration"] = index.iteration
        info["canonical_tensors"] = len(index.slices)
        info["canonical_bytes"] = index.total_bytes
        info["not_carried"] = index.not_carried
        if index.optimizer is not None:
            info["optimizer"] = optimizer_summary(index)
        for f, names in sorted(index.unlisted.items()):
            info["problems"].append(f"{f} holds {len(names)} tensor(s) the index does not name: {sorted(names)[:8]}")
    except ReshardError as e:
        if str(e) not in info["problems"]:  # the same broken header found by both passes: say it once
            info["problems"].append(str(e))
    info["beside"] = leftovers(path)  # a running or interrupted run's claim, staging, journal
    info["files"] = len({t["file"] for t in info["tensors"]})
    info["stored_bytes"] = sum(t["bytes"] for t in info["tensors"])
    return info


def optimizer_summary(index) -> dict:
    """What a training checkpoint's optimizer state is and whether this version carries it."""
    from . import optim

    o = index.optimizer
    names = optim.shadows(index.slices)
    groups = ((o.get("state") or {}).get("optimizer") or {}).get("param_groups") or []
    steps = sorted({g.get("step") for g in groups if isinstance(g, dict) and g.get("step") is not None})
    return {"form": o["sharding"], "kinds": o["kinds"], "tensors": len(names),
            "bytes": sum(s.stored.dtype.itemsize * math.prod(s.size) for n in names for s in index.slices[n]),
            "param_groups": len(groups), "step": steps[0] if len(steps) == 1 else steps or None,
            "scheduler": o.get("scheduler") is not None, "problems": list(o["problems"]),
            "warnings": list(o.get("warnings", ()))}


def format_text(info: dict) -> str:
    lines = [f"{info['path']}: {info['format']}" + (f", iteration {info['iteration']}"
                                                   if info.get("iteration") is not None else "")]
    a = info.get("architecture")
    if a:
        rope = f"rope theta {a['rope_theta']:g}" + (f" ({a['rope_scaling'].get('rope_type')} x"
                                                    f"{a['rope_scaling'].get('factor')})" if a["rope_scaling"] else "")
        if a["model_type"] in ENCODER_TYPES:  # LayerNorm, GeLU, biases everywhere, learned positions
            rope = (f"LayerNorm eps {a['norm_eps']:g}, learned positions {a['max_position_embeddings']}, token types "
                    f"{a.get('num_tokentypes', 0)}, binary head {a.get('binary_head', False)}")
        else:
            rope = f"qkv bias {a['qkv_bias']}, norm eps {a['norm_eps']:g}, {rope}"
        lines.append(f"architecture: {a['model_type']}, {a['num_layers']} layers, hidden {a['hidden_size']}, "
                     f"heads {a['num_attention_heads']} (kv {a['num_query_groups']}), head_dim {a['head_dim']}, "
                     f"ffn {a['ffn_hidden_size']}, vocab {a['vocab_size']}, tied {a['tie_word_embeddings']}, {rope}")
        if a.get("num_experts"):
            shared = ""
            if a.get("shared_expert_ffn_hidden_size"):
                shared = (f", shared expert ffn {a['shared_expert_ffn_hidden_size']}"
                          + (" (gated)" if a.get("shared_expert_gate") else ""))
            lines.append(f"experts: {a['num_experts']} per layer, top-{a['num_experts_per_tok']}, expert ffn "
                         f"{a.get('moe_ffn_hidden_size') or a['ffn_hidden_size']}{shared}"
                         + (", router expert bias" if a.get("moe_expert_bias") else ""))
            if a.get("dense_layers"):
                lines.append(f"dense layers: {list(a['dense_layers'])} (the others MoE)")
            if a.get("moe_router_num_groups"):
                lines.append(f"routing: {a.get('moe_router_score_function')}, best {a['moe_router_group_topk']} of "
                             f"{a['moe_router_num_groups']} groups, x{a.get('moe_router_topk_scaling_factor')}")
        if a.get("kv_lora_rank"):
            lines.append(f"multi-latent attention: q_lora {a.get('q_lora_rank')}, kv_lora {a['kv_lora_rank']}, "
                         f"q/k head {a['qk_nope_head_dim']} + {a['qk_rope_head_dim']} rope, v head {a['v_head_dim']}")
        if a.get("mtp_layers"):
            lines.append(f"multi-token prediction: {a['mtp_layers']} layer(s) in the source's config (not converted)")
    lay = info.get("layout")
    if lay:
        lines.append("layout: " + ", ".join(f"{k}={v}" for k, v in lay.items() if v is not None))
    lines.append(f"stored tensors: {len(info['tensors'])} in {info['files']} file(s), "
                 f"{info['stored_bytes'] / 1e9:.3f} GB")
    w = max([len(t["name"]) for t in info["tensors"]] + [4])
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{w}}  {str(tuple(t['shape'])):<22} {t['dtype']:<9} {t['bytes']:>14,d}  "
                     f"{t['file']}")
    o = info.get("optimizer")
    if o:
        lines.append(f"optimizer state: {o['form']}, {', '.join(o['kinds']) or 'nothing decoded'}: {o['tensors']} "
                     f"tensor(s) shadowing the weights, {o['bytes'] / 1e9:.3f} GB, {o['param_groups']} param group(s), "
                     f"step {o['step']}, scheduler state {'yes' if o['scheduler'] else 'no'}; "
                     + ("carried to torch_dist / megatron_legacy by optimizer=auto|keep" if not o["problems"] else
                        "NOT carried (optimizer=drop converts the weights only): " + "; ".join(o["problems"][:3])))
        lines += [f"  WARNING: {w}" for w in o["warnings"]]
    nc = dict(info.get("not_carried") or {})
    if o and not o["problems"]:  # named on its own line above
        for kind in ("optimizer state", "distributed optimizer state"):
            nc.pop(kind, None)
        if o["scheduler"]:
            nc.pop("learning-rate scheduler state", None)
    if nc:
        from .report import not_carried_text

        lines.append("not converted by this version (training state beside the weights): " + not_carried_text(nc))
    if info.get("beside"):
        lines.append("beside it (a reshard run writing here now, or one that was interrupted: `reshard clean "
                     f"{info['path']}` removes what a gone run left): " + ", ".join(info["beside"]))
    if info["problems"]:
        lines.append("PROBLEMS:")
        lines += ["  " + p.replace("\n", "\n  ") for p in info["problems"]]
    else:
        lines.append("problems: none (every tensor the architecture needs is present, shapes tile, args agree)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reshard inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--format", default="auto", help="auto, hf, meta, megatron_legacy, torch_dist, fsdp_dtensor")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="true vocab of a Megatron checkpoint whose args record only the padded one")
    a = ap.parse_args(argv)
    try:
        info = inspect(a.path, a.format, a.vocab_size)
    except ReshardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=str) if a.json else format_text(info))
    return 1 if info["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
