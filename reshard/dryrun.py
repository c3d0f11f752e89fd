"""``dry_run=true``: the plan of a conversion, without moving data.

Per rank: bytes to read, send, receive and write, the files it opens, and an estimate of its
peak memory (what it holds between the exchange and the write, plus the largest unit it
assembles or reads at once, on top of the interpreter); warnings for idle ranks and for an
exchange buffer smaller than the largest piece. ``dry_run_world=N`` plans for N ranks from a
single process (e.g. a 1,024-rank job planned on a laptop).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import List

INTERPRETER_MB = 280  # an idle rank: python + torch + DCP + hydra (measured, benchmarks/)


def report(plan, file_based: bool) -> dict:
    stats = plan.rank_stats()
    unit = [0] * plan.world
    if file_based:
        owner = {}
        for p in plan.pieces:
            owner[plan.targets[p.key].file] = p.writers[0]
        sizes = defaultdict(int)
        for t in plan.targets.values():
            sizes[t.file] += t.nbytes
        for f, r in owner.items():
            unit[r] = max(unit[r], sizes[f])
    for p in plan.pieces:
        unit[p.reader] = max(unit[p.reader], p.src_nbytes)
    ranks = []
    for r, s in enumerate(stats):
        ranks.append({"rank": r, "read": s["read"], "send": s["send"], "recv": s["recv"], "write": s["write"],
                      "pieces_read": s["pieces_read"], "files_opened": s["files"],
                      "est_peak_mb": round(INTERPRETER_MB + (s["recv"] + unit[r]) / 2**20, 1)})
    warnings: List[str] = []
    idle = [r["rank"] for r in ranks if r["read"] == 0 and r["write"] == 0]
    if idle:
        warnings.append(f"{len(idle)} idle rank(s) (nothing to read or write): {idle[:16]}"
                        f"{' ...' if len(idle) > 16 else ''}; fewer ranks would do")
    writers = [r for r in ranks if r["write"] > 0]
    if len(writers) < len(ranks) and len(idle) < len(ranks) - len(writers):
        warnings.append(f"{len(ranks) - len(writers)} rank(s) write nothing (only {len(writers)} hold target data)")
    mean_w = sum(r["write"] for r in ranks) / max(1, len(ranks))
    top = max(ranks, key=lambda r: r["write"]) if ranks else None
    if top and mean_w and top["write"] > 2 * mean_w:
        warnings.append(f"uneven writes: rank {top['rank']} writes {top['write'] / 1e9:.2f} GB, the mean is "
                        f"{mean_w / 1e9:.2f} GB (estimated peak {top['est_peak_mb']:.0f} MB); with torch_dist, "
                        "io.assign=auto lets every reader write what it read")
    biggest = max((p.out_nbytes for p in plan.pieces), default=0)
    if biggest > plan.buffer_bytes:
        warnings.append(f"the largest piece ({biggest / 2**20:.1f} MiB) is larger than the exchange buffer "
                        f"(io.buffer_mb={plan.buffer_bytes / 2**20:g}): rounds exceed the budget; raise io.buffer_mb "
                        "or lower io.max_piece_mb")
    return {"world_size": plan.world, "pieces": len(plan.pieces), "rounds": plan.num_rounds,
            "buffer_bytes": plan.buffer_bytes, "max_piece_bytes": biggest, "ranks": ranks, "warnings": warnings}


def format_text(rep: dict, head: int = 8) -> str:
    gb = lambda n: f"{n / 1e9:9.3f}"  # noqa: E731
    lines = [f"dry run: {rep['world_size']} rank(s), {rep['pieces']} pieces, {rep['rounds']} exchange round(s), "
             f"largest piece {rep['max_piece_bytes'] / 2**20:.1f} MiB, buffer {rep['buffer_bytes'] / 2**20:g} MiB",
             f"{'rank':>6} {'read GB':>9} {'send GB':>9} {'recv GB':>9} {'write GB':>9} {'files':>6} "
             f"{'est peak MB':>12}"]
    ranks = rep["ranks"]
    shown = ranks if len(ranks) <= 2 * head else ranks[:head] + [None] + ranks[-head:]
    for r in shown:
        if r is None:
            lines.append(f"{'...':>6}")
            continue
        lines.append(f"{r['rank']:>6} {gb(r['read'])} {gb(r['send'])} {gb(r['recv'])} {gb(r['write'])} "
                     f"{len(r['files_opened']):>6} {r['est_peak_mb']:>12.0f}")
    for key in ("read", "write", "est_peak_mb"):
        vals = [r[key] for r in ranks]
        scale = 1 if key == "est_peak_mb" else 1e9
        unit = "MB" if key == "est_peak_mb" else "GB"
        lines.append(f"{key}: min {min(vals) / scale:.3f}, median {statistics.median(vals) / scale:.3f}, "
                     f"max {max(vals) / scale:.3f} {unit}")
    lines.append(f"files opened per rank: max {max(len(r['files_opened']) for r in ranks)}; "
                 f"rank 0 opens {ranks[0]['files_opened'][:4]}{' ...' if len(ranks[0]['files_opened']) > 4 else ''}")
    lines += [f"WARNING: {w}" for w in rep["warnings"]] or ["warnings: none"]
    return "\n".join(lines)
