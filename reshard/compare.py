"""``reshard compare <a> <b>``: two checkpoints of any formats and layouts, tensor by tensor in
canonical form (HF names and layouts, padding dropped, RoPE order undone).

Each canonical tensor is read from both sides in row blocks (bounded memory) - equal, or the
max abs diff and the first differing index. Under torchrun the tensors are shared out over the
ranks. Exit status 0 only when every tensor is equal (within ``--atol``, compared in float32,
for cross-dtype comparisons) and both hold the same tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

import torch

from . import dist as rdist
from .errors import ReshardError
from .formats.base import stored_offset

BLOCK_BYTES = 256 << 20


def _rows(index, name: str, reader, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of canonical tensor ``name``, assembled from the index's slices."""
    from .verify import read_slice

    shape = index.shapes[name]
    out = torch.empty((r1 - r0,) + tuple(shape[1:]), dtype=index.dtypes[name])
    for sl in index.slices[name]:
        a, b = max(r0, sl.c_off[0]), min(r1, sl.c_off[0] + sl.size[0])
        if a >= b:
            continue
        sub = type(sl)(sl.stored, (a,) + tuple(sl.c_off[1:]),
                       stored_offset(sl.s_off, (a - sl.c_off[0],) + (0,) * (len(sl.size) - 1), sl.transform),
                       (b - a,) + tuple(sl.size[1:]), sl.transform)
        idx = (slice(a - r0, b - r0),) + tuple(slice(o, o + s) for o, s in zip(sl.c_off[1:], sl.size[1:]))
        out[idx] = read_slice(reader, sub)
    return out


def compare_tensor(ia, ib, name, ra, rb, atol: float) -> dict:
    shape = tuple(ia.shapes[name])
    res = {"name": name, "shape": list(shape), "dtype_a": str(ia.dtypes[name])[6:],
           "dtype_b": str(ib.dtypes[name])[6:]}
    if shape != tuple(ib.shapes[name]):
        res.update(equal=False, reason=f"shape {shape} vs {tuple(ib.shapes[name])}")
        return res
    row = max(1, math.prod(shape[1:]) * max(ia.dtypes[name].itemsize, 4))
    step = max(1, BLOCK_BYTES // row)
    worst, first = 0.0, None
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        x, y = _rows(ia, name, ra, r0, r1), _rows(ib, name, rb, r0, r1)
        if x.dtype == y.dtype and atol == 0:
            diff_mask = (x != y) & ~(torch.isnan(x) & torch.isnan(y)) if x.is_floating_point() else x != y
            if bool(diff_mask.any()):
                d = (x.float() - y.float()).abs()
                worst = max(worst, float(d.max()))
                if first is None:
                    first = _first(diff_mask, r0)
            continue
        d = (x.float() - y.float()).abs()
        bad = d > atol
        if bool(bad.any()):
            worst = max(worst, float(d.max()))
            if first is None:
                first = _first(bad, r0)
    res["equal"] = first is None
    if first is not None:
        res.update(max_abs_diff=worst, first_difference=first)
    return res


def _first(mask: torch.Tensor, r0: int) -> List[int]:
    flat = int(mask.reshape(-1).nonzero()[0])
    idx = list(torch.unravel_index(torch.tensor(flat), mask.shape))
    return [int(idx[0]) + r0] + [int(i) for i in idx[1:]]


def compare(a: str, b: str, atol: float = 0.0, vocab_size: Optional[int] = None) -> dict:
    from . import formats

    fa, fb = formats.detect(os.path.abspath(a)), formats.detect(os.path.abspath(b))
    ia = fa.read_index(os.path.abspath(a), None, vocab_size)
    ib = fb.read_index(os.path.abspath(b), None, vocab_size)
    na, nb = set(ia.slices), set(ib.slices)
    common = sorted(na & nb)
    # share the tensors out over the ranks by size
    world, rank = rdist.world(), rdist.rank()
    load = [0] * world
    mine = []
    for n in sorted(common, key=lambda n: (-math.prod(ia.shapes[n]), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += math.prod(ia.shapes[n])
        if r == rank:
            mine.append(n)
    ra, rb = fa.Reader(ia.root), fb.Reader(ib.root)
    try:
        results = [compare_tensor(ia, ib, n, ra, rb, atol) for n in sorted(mine)]
    finally:
        ra.close()
        rb.close()
    allres: List[dict] = sorted((r for part in rdist.gather_objects(results) for r in part), key=lambda r: r["name"])
    return {"a": {"path": ia.root, "format": ia.format}, "b": {"path": ib.root, "format": ib.format},
            "atol": atol, "only_in_a": sorted(na - nb), "only_in_b": sorted(nb - na), "tensors": allres,
            "equal": all(r["equal"] for r in allres) and na == nb}


def format_text(res: dict) -> str:
    lines = [f"a: {res['a']['path']} ({res['a']['format']})", f"b: {res['b']['path']} ({res['b']['format']})"]
    diff = [r for r in res["tensors"] if not r["equal"]]
    for r in diff:
        why = r.get("reason") or f"max abs diff {r['max_abs_diff']:.6g}, first at {r['first_difference']}"
        lines.append(f"DIFFERS {r['name']}: {why}")
    for side in ("a", "b"):
        for n in res[f"only_in_{side}"]:
            lines.append(f"ONLY IN {side.upper()} {n}")
    n_eq = len(res["tensors"]) - len(diff)
    lines.append(f"{n_eq} of {len(res['tensors'])} canonical tensors equal"
                 + (f" (atol {res['atol']:g})" if res["atol"] else "")
                 + f"; {len(diff)} differ; {len(res['only_in_a'])} only in a, {len(res['only_in_b'])} only in b")
    lines.append("EQUAL" if res["equal"] else "DIFFERENT")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="reshard compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--atol", type=float, default=0.0, help="tolerance, compared in float32 (default: bit-exact)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="true vocab of Megatron checkpoints not made by reshard")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: the tensors are shared out
        rdist.init("cpu")
    try:
        res = compare(a.a, a.b, a.atol, a.vocab_size)
    except ReshardError as e:
        if rdist.rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rdist.rank() == 0:
        print(json.dumps(res, indent=2) if a.json else format_text(res))
    if rdist.world() > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0 if res["equal"] else 1

