"""Export to Hugging Face for every family, and the Meta format both ways.

Referees: transformers loads every HF output offline and its logits equal the source model's;
an independent Meta-style forward pass (adjacent-pair rotation, ``tests/referees/meta_llama.py``)
on the Meta output gives the source's logits - a round trip alone cannot prove the RoPE
permutation, since a wrong one round-trips too.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import run_reshard
from tests.expected import load_hf, read_dcp
from tests.referees import hf_logits, meta_llama

TOL = 1e-5


def _conv(src, out, nproc=1, *extra):
    return run_reshard([f"source.path={src}", f"target.path={out}", f"paths.root={os.path.dirname(out)}", *extra],
                       nproc=nproc)


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "qwen2"])
def test_torch_dist_to_hf_loads_in_transformers_with_the_source_logits(hf_models, tmp_path, family):
    td, out = str(tmp_path / "td"), str(tmp_path / "hf")
    _conv(hf_models[family], td, 1, "parallel.target_tp=2", "parallel.target_pp=2")
    _conv(td, out, 2, "target.format=hf", "target.max_shard_size=40KB")
    diff = _max_diff(hf_logits.logits(hf_models[family]), hf_logits.logits(out))
    print(f"{family}: max abs logits diff {diff:.3g}")
    assert diff <= TOL
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert ("lm_head.weight" in weight_map) == (family != "qwen2")  # tied: no lm_head
    assert len(set(weight_map.values())) > 3  # several files, written by both ranks
    assert weight_map.keys() == load_hf(hf_models[family]).keys()
    assert os.path.isfile(os.path.join(out, "generation_config.json"))


def test_hf_to_hf_keeps_the_original_file_layout_and_side_files(hf_models, tmp_path):
    src = str(tmp_path / "src")
    import shutil

    shutil.copytree(hf_models["llama3"], src)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128}, f)
    out = str(tmp_path / "out")
    _conv(src, out, 2, "target.format=hf", "target.dtype=bfloat16")
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        want = json.load(f)["weight_map"]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        got = json.load(f)["weight_map"]
    assert got == want
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    a, b = load_hf(src), load_hf(out)
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)


def test_torch_dist_to_hf_to_torch_dist_is_identical(hf_models, tmp_path):
    a, h, b = (str(tmp_path / x) for x in ("a", "h", "b"))
    _conv(hf_models["qwen2"], a, 1, "parallel.target_tp=2", "parallel.target_pp=2")
    _conv(a, h, 3, "target.format=hf")
    _conv(h, b, 1, "parallel.target_tp=2", "parallel.target_pp=2")
    ta, _ = read_dcp(os.path.join(a, "release"))
    tb, _ = read_dcp(os.path.join(b, "release"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_legacy_to_hf_to_legacy_is_identical(hf_models, tmp_path):
    a, h, b = (str(tmp_path / x) for x in ("a", "h", "b"))
    legacy = ["target.format=megatron_legacy", "parallel.target_tp=2", "parallel.target_pp=2"]
    _conv(hf_models["llama3"], a, 2, *legacy)
    _conv(a, h, 3, "target.format=hf")
    _conv(h, b, 1, *legacy)
    n = 0
    for d in sorted(os.listdir(os.path.join(a, "release"))):
        x = torch.load(os.path.join(a, "release", d, "model_optim_rng.pt"), weights_only=False)["model"]
        y = torch.load(os.path.join(b, "release", d, "model_optim_rng.pt"), weights_only=False)["model"]
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] is None and y[k] is None) or torch.equal(x[k], y[k]), (d, k)
            n += 1
    assert n > 40


# ---------------------------------------------------------------- Meta

def _hf_with_8_heads(path):
    """Llama with 8 heads and 8 kv heads, so that 8 Meta shards hold one head each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=8, head_dim=8, vocab_size=256, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.mark.parametrize("shards", [1, 2, 8])
def test_hf_to_meta_to_hf_is_identical(tmp_path, shards):
    src = _hf_with_8_heads(str(tmp_path / "src"))
    meta, back = str(tmp_path / "meta"), str(tmp_path / "back")
    _conv(src, meta, 3 if shards == 8 else 1, "target.format=meta", f"target.meta_shards={shards}")
    assert sorted(f for f in os.listdir(meta) if f.endswith(".pth")) == [
        f"consolidated.{s:02d}.pth" for s in range(shards)]
    _conv(meta, back, 2 if shards == 2 else 1, "target.format=hf")
    a, b = load_hf(src), load_hf(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if shards == 8:  # the RoPE permutation, proved by logits against an independent implementation
        ref = hf_logits.logits(src)
        got = meta_llama.forward(meta, hf_logits.tokens(256))
        assert _max_diff(got, ref) <= TOL


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_meta_output_gives_the_source_logits_in_a_meta_style_forward(hf_models, tmp_path, family):
    meta = str(tmp_path / "meta")
    _conv(hf_models[family], meta, 1, "target.format=meta", "target.meta_shards=2")
    with open(os.path.join(meta, "params.json")) as f:
        params = json.load(f)
    vocab = params["vocab_size"]
    ref = hf_logits.logits(hf_models[family])
    diff = _max_diff(meta_llama.forward(meta, hf_logits.tokens(vocab)), ref)
    print(f"{family}: Meta-style forward vs transformers: max abs diff {diff:.3g}")
    assert diff <= TOL
    # The referee is sensitive: wq/wk left in HF order (no permutation) change the logits.
    for s in range(2):
        p = os.path.join(meta, f"consolidated.{s:02d}.pth")
        sd = torch.load(p, weights_only=True)
        from reshard.transforms import rope_meta_to_hf

        for k in list(sd):
            if k.endswith(("attention.wq.weight", "attention.wk.weight")):
                sd[k] = rope_meta_to_hf(sd[k], sd[k].shape[0] // (params["dim"] // params["n_heads"]))
        torch.save(sd, p)
    assert _max_diff(meta_llama.forward(meta, hf_logits.tokens(vocab)), ref) > 100 * TOL


def test_meta_to_torch_dist_equals_hf_to_torch_dist(hf_models, tmp_path):
    meta, a, b = (str(tmp_path / x) for x in ("meta", "a", "b"))
    _conv(hf_models["llama3"], meta, 1, "target.format=meta", "target.meta_shards=2")
    _conv(meta, a, 2, "parallel.target_tp=2", "parallel.target_pp=2")
    _conv(hf_models["llama3"], b, 1, "parallel.target_tp=2", "parallel.target_pp=2")
    ta, _ = read_dcp(os.path.join(a, "release"))
    tb, _ = read_dcp(os.path.join(b, "release"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(os.path.join(hf_models["llama3"], "model-00001-of-00015.safetensors"), "pt") as h:
        assert h.keys()  # the fixture is the multi-shard transformers save
