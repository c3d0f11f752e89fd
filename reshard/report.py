"""Print the summary of a ``reshard_report.json``: ``python -m reshard.report <target dir>``."""

from __future__ import annotations

import json
import os
import sys


def not_carried_text(not_carried: dict) -> str:
    """One line for what the source held and the output does not (``SourceIndex.not_carried``)."""
    return "; ".join(f"{kind} ({d['entries']} entr{'y' if d['entries'] == 1 else 'ies'}"
                     + (f", {d['bytes'] / 1e6:.3f} MB" if d["bytes"] else "") + f": {d['where']})"
                     for kind, d in sorted(not_carried.items()))


def summarize(target: str) -> str:
    with open(os.path.join(target, "reshard_report.json")) as f:
        r = json.load(f)
    lay, spec, t = r["layout"], r["spec"], r["totals"]
    lines = [
        f"{r['source']['path']} ({r['source']['format']}, {r['source']['bytes'] / 1e6:.1f} MB) -> "
        f"{r['target']['path']} ({r['target']['format']})",
        f"model: {spec['model_type']} {spec['num_layers']} layers, hidden {spec['hidden_size']}, heads "
        f"{spec['num_attention_heads']}/{spec['num_query_groups']} kv, vocab {spec['vocab_size']}"
        + (f", {spec['num_experts']} experts (top-{spec['num_experts_per_tok']})" if spec.get("num_experts") else ""),
        f"layout: tp={lay['tp']} pp={lay['pp']} vpp={lay['vpp']}"
        + (f" ep={lay['ep']} etp={lay.get('etp') or lay['tp']}" if spec.get("num_experts") else "")
        + f" on {r['world_size']} rank(s); "
        f"{r['pieces']} pieces, {r['rounds']} exchange round(s)",
        f"bytes: read {t['bytes_read']}, sent {t['bytes_sent']}, received {t['bytes_received']}, "
        f"written {t['bytes_written']} ({t.get('bytes_kernel_copied', 0)} copied file to file by the kernel)",
    ]
    for rk in r["ranks"]:
        secs = ", ".join(f"{k} {v:.2f}s" for k, v in rk["seconds"].items())
        lines.append(f"  rank {rk['rank']}: read {rk['bytes_read']} B from {len(rk['files_opened'])} file(s), "
                     f"wrote {rk['bytes_written']} B, peak RSS {rk['peak_rss_mb']:.0f} MB ({secs})")
    if r.get("not_carried"):
        lines.append("NOT CARRIED (in the source, not in the output): "
                     + not_carried_text(r["not_carried"]))
    v = r.get("verify")
    lines.append(f"verified: {v['tensors']} canonical tensors, checksums of the re-read output equal the source's "
                 f"({v['seconds']:.2f} s)" if v else "not verified (verify=false)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
