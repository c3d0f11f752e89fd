"""An independent forward pass in the style of Meta's reference ``llama/model.py`` (complex
rotation of *adjacent* pairs, ``params.json`` hyper-parameters, shards merged on Meta's axes).
It never uses reshard: it is the referee that proves the RoPE permutation, not a round trip."""

import json
import math
import os

import torch

ROW = ("wq", "wk", "wv", "w1", "w3", "output")
COL = ("wo", "w2")


def load_consolidated(path):
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    files = sorted(f for f in os.listdir(path) if f.startswith("consolidated."))
    shards = [torch.load(os.path.join(path, f), map_location="cpu", weights_only=True) for f in files]
    dim = params["dim"]
    w = {}
    for k in shards[0]:
        parts = [s[k] for s in shards]
        short = k.split(".")[-2]
        if len(parts) == 1 or parts[0].dim() == 1:
            w[k] = parts[0]
        elif short in ROW:
            w[k] = torch.cat(parts, 0)
        elif short in COL:
            w[k] = torch.cat(parts, 1)
        elif k == "tok_embeddings.weight":
            w[k] = torch.cat(parts, 1 if parts[0].shape[1] * len(parts) == dim else 0)
        else:
            raise KeyError(k)
    return params, w


def _scale(freqs, factor=8.0, low=1.0, high=4.0, old_ctx=8192):
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=freqs.dtype)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cis):  # x [b, s, h, hd]: adjacent pairs are complex numbers
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def forward(path, tokens):
    p, w = load_consolidated(path)
    dim, nh = p["dim"], p["n_heads"]
    nkv = p.get("n_kv_heads") or nh
    hd = dim // nh
    eps = p["norm_eps"]
    freqs = 1.0 / (p.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    if p.get("use_scaled_rope"):
        freqs = _scale(freqs, p.get("rope_scaling_factor", 8.0))
    s = tokens.shape[1]
    cis = torch.polar(torch.ones(s, hd // 2, dtype=torch.float64), torch.outer(torch.arange(s).double(), freqs))
    cis = cis.to(torch.complex64)
    h = w["tok_embeddings.weight"][tokens]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        L = lambda n: w[f"layers.{i}.{n}"]  # noqa: E731
        x = _rms(h, L("attention_norm.weight"), eps)
        b = x.shape[0]
        q = (x @ L("attention.wq.weight").T).view(b, s, nh, hd)
        k = (x @ L("attention.wk.weight").T).view(b, s, nkv, hd)
        v = (x @ L("attention.wv.weight").T).view(b, s, nkv, hd)
        q, k = _rotate(q, cis), _rotate(k, cis)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / math.sqrt(hd) + mask
        o = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, s, dim)
        h = h + o @ L("attention.wo.weight").T
        x = _rms(h, L("ffn_norm.weight"), eps)
        g = torch.nn.functional.silu(x @ L("feed_forward.w1.weight").T) * (x @ L("feed_forward.w3.weight").T)
        h = h + g @ L("feed_forward.w2.weight").T
    return _rms(h, w["norm.weight"], eps) @ w["output.weight"].T
