"""Block-scaled FP8 sources (DeepSeek-V3, Kimi-K2, Qwen3-FP8 on the Hub): ``float8_e4m3fn``
weights with ``<name>_scale_inv`` block scales and ``quantization_config.weight_block_size``,
dequantized as each piece is read (``fp8.float() * scale`` per block), never as a whole tensor.

The source is a tiny Qwen3 saved by transformers whose linear weights this module quantizes
with the published rule (scale = block amax / 448), with blocks (24 x 40) that do not divide the
weights, so edge blocks are partial. The expected values are computed here from the quantized
bytes and scales, independently of reshard.
"""

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_json, run_reshard, save_transformers_model

BLOCK = (24, 40)


def quantize(src: str, dst: str, block=BLOCK, drop_scale=None) -> dict:
    """Write ``dst``: ``src`` with every linear weight in FP8 plus its ``_scale_inv`` (as the published
    DeepSeek-V3 weights: not the embedding, the output layer, the norms or the router); returns the
    dequantized value of every tensor (float32)."""
    os.makedirs(dst)
    br, bc = block
    expected, weight_map = {}, {}
    for f in sorted(os.listdir(src)):
        p = os.path.join(src, f)
        if not f.endswith(".safetensors"):
            if f not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(p, dst)
            continue
        out = {}
        for k, w in load_file(p).items():
            if w.dim() == 2 and not any(x in k for x in ("embed_tokens", "lm_head", "norm", "mlp.gate.")):
                R, C = w.shape
                nr, nc = -(-R // br), -(-C // bc)
                pad = torch.zeros(nr * br, nc * bc)
                pad[:R, :C] = w.float()
                scale = pad.view(nr, br, nc, bc).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
                full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:R, :C]
                q = (w.float() / full).to(torch.float8_e4m3fn)
                out[k], expected[k] = q, q.float() * full
                if k != drop_scale:
                    out[k + "_scale_inv"] = scale.contiguous()
            else:
                out[k], expected[k] = w, w.float()
        save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in out})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return expected


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    hf = save_transformers_model("tiny_qwen3", str(root / "hf"), max_shard_size="40KB")
    return root, quantize(hf, str(root / "fp8"))


def test_the_source_really_is_fp8_with_partial_edge_blocks(fp8):
    root, _ = fp8
    t = {}
    for f in glob.glob(str(root / "fp8" / "*.safetensors")):
        t.update(load_file(f))
    q, s = t["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (128, 64) and s.shape == (6, 2)  # 128/24, 64/40 rounded up


def test_fp8_to_bf16_torch_dist_on_3_ranks_equals_the_dequantized_weights(fp8, tmp_path):
    from reshard.synthetic import load_preset
    from tests.expected import expected_torch_dist, read_dcp

    root, expected = fp8
    out = str(tmp_path / "td")
    run_reshard([f"source.path={root / 'fp8'}", f"target.path={out}", "parallel.target_tp=2", "parallel.target_pp=2",
                 "target.dtype=bfloat16", f"paths.root={tmp_path}", "launch.nproc=3"])
    tensors, _ = read_dcp(os.path.join(out, "release"))
    spec = load_preset("tiny_qwen3").to_dict()
    want = expected_torch_dist({k: v.to(torch.bfloat16) for k, v in expected.items()}, spec, 512)
    want["decoder.layers.self_attention.q_layernorm.weight"] = torch.stack(
        [expected[f"model.layers.{i}.self_attn.q_norm.weight"] for i in range(4)]).to(torch.bfloat16)
    want["decoder.layers.self_attention.k_layernorm.weight"] = torch.stack(
        [expected[f"model.layers.{i}.self_attn.k_norm.weight"] for i in range(4)]).to(torch.bfloat16)
    assert set(want) == set(tensors)
    for k, v in want.items():
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v), k
    report = read_json(os.path.join(out, "reshard_report.json"))
    assert report["verify"]["ok"] and report["verify"]["tensors"] == len(expected)  # the scales are not tensors


def test_fp8_to_hf_keeps_the_checkpoint_dtype_and_drops_the_quantization(fp8, tmp_path):
    from tests.expected import load_hf

    root, expected = fp8
    out = str(tmp_path / "hf")
    run_reshard([f"source.path={root / 'fp8'}", f"target.path={out}", "target.format=hf", f"paths.root={tmp_path}"])
    got = load_hf(out)
    assert sorted(got) == sorted(expected)  # no _scale_inv
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]) for k in expected)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)


def test_an_fp8_weight_without_its_scale_is_named_and_nothing_is_written(fp8, tmp_path):
    root, _ = fp8
    src = str(tmp_path / "noscale")
    quantize(str(root / "hf"), src, drop_scale="model.layers.2.mlp.up_proj.weight")
    out = str(tmp_path / "out")
    p = run_reshard([f"source.path={src}", f"target.path={out}", f"paths.root={tmp_path}"], check=False)
    assert p.returncode != 0
    assert "model.layers.2.mlp.up_proj.weight is float8 but its scale " \
           "model.layers.2.mlp.up_proj.weight_scale_inv is absent" in p.stdout + p.stderr
    assert not os.path.exists(out) and not glob.glob(str(tmp_path / ".out*"))


def test_fp8_without_a_block_scaled_quantization_config_is_refused(fp8, tmp_path):
    root, _ = fp8
    src = str(tmp_path / "nocfg")
    shutil.copytree(root / "fp8", src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    del cfg["quantization_config"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    p = run_reshard([f"source.path={src}", f"target.path={tmp_path / 'out'}", f"paths.root={tmp_path}"], check=False)
    assert p.returncode != 0 and "no block-scaled fp8 quantization_config" in p.stdout + p.stderr


def test_a_scale_of_the_wrong_shape_is_refused(fp8, tmp_path):
    root, _ = fp8
    src = str(tmp_path / "badscale")
    shutil.copytree(root / "fp8", src)
    for f in glob.glob(os.path.join(src, "*.safetensors")):
        t = load_file(f)
        k = "model.layers.1.self_attn.o_proj.weight_scale_inv"
        if k in t:
            t[k] = t[k][:, :1].contiguous()
            save_file(t, f, metadata={"format": "pt"})
    p = run_reshard([f"source.path={src}", f"target.path={tmp_path / 'out'}", f"paths.root={tmp_path}"], check=False)
    assert p.returncode != 0 and "model.layers.1.self_attn.o_proj.weight_scale_inv has shape (3, 1)" in p.stdout + p.stderr
