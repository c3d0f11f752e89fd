"""DeepSeek-V3 (multi-latent attention, dense first layer, sigmoid-routed experts with a score-correction
bias, group-limited routing, ungated shared experts), with and without the q latent (Moonlight's shape),
refereed by transformers and Megatron-core (its MLA, local spec; see ``tests/referees/mcore.py`` for the
one CPU stand-in, the attention score kernel).

One chain per variant, run once for the module (every launch is a real torchrun with gloo):

  transformers ``save_pretrained`` (several shards, norms, biases and the router's score correction
  perturbed) -> torch_dist and legacy (TE names) at TP=2 PP=2 EP=2 on 3 ranks -> HF on 2 ranks from each
  -> transformers logits equal to the source's; torch_dist -> Megatron-core ``dist_checkpointing.load``
  at TP=2 EP=2, PP=2 EP=2 and TP=1 on 4 ranks, every tensor compared with the HF source mapped by hand,
  its own forward pass against transformers; local-spec legacy files at TP=2 EP=2 strictly loaded.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, run_jobs, run_reshard, run_torchrun, save_transformers_model

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")
VARIANTS = {"q_lora": "tiny_deepseek_v3", "no_q_lora": "tiny_deepseek_v3_no_q_lora"}




@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    d = {v: {k: str(root / v / k) for k in ("td", "leg", "leg_mc", "td_hf", "leg_hf", "mg")} for v in VARIANTS}
    for v, preset in VARIANTS.items():
        d[v]["hf"] = save_transformers_model(preset, str(root / v / "hf"), max_shard_size="40KB")
    layout = ["parallel.target_tp=2", "parallel.target_pp=2", "parallel.target_ep=2"]
    jobs = []
    for x in d.values():
        jobs += [[f"source.path={x['hf']}", f"target.path={x['td']}", *layout],
                 [f"source.path={x['hf']}", f"target.path={x['leg']}", "target.format=megatron_legacy", *layout],
                 [f"source.path={x['td']}", f"target.path={x['leg_mc']}", "target.format=megatron_legacy",
                  "parallel.target_tp=2", "parallel.target_ep=2", "target.transformer_impl=local"]]
    run_jobs(3, jobs, root, "to_megatron")
    run_jobs(2, [[f"source.path={x[s]}", f"target.path={x[s + '_hf']}", "target.format=hf"]
              for x in d.values() for s in ("td", "leg")], root, "to_hf")
    # Megatron-core 0.19.2 builds MLA without a q latent only with a norm fused into linear_q_proj
    # (mla_qk_norm_config: qk_layernorm=True and q_lora_rank=None), which HF's q_proj does not have and the
    # local spec cannot build on CPU; that variant is refereed by transformers alone (module docstring).
    x = d["q_lora"]
    p = run_torchrun(4, [CHECK, os.path.join(x["td"], "release"), x["hf"], "2,1,2", "1,2,2", "1,1,1",
                         "--legacy", os.path.join(x["leg_mc"], "release"), "--logits", "--resave", x["mg"]],
                     timeout=900)
    x["oks"] = [line for line in p.stdout.splitlines() if line.startswith("OK")]
    return d


@pytest.mark.parametrize("via", ["td", "leg"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_through_a_megatron_format_and_back_gives_the_source_logits(chain, variant, via):
    from tests.expected import load_hf
    from tests.referees.hf_logits import logits

    x = chain[variant]
    src, out = load_hf(x["hf"]), load_hf(x[via + "_hf"])
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
    assert ("model.layers.1.self_attn.q_a_proj.weight" in src) == (variant == "q_lora")
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in out and "model.layers.0.mlp.gate_proj.weight" in out
    assert (logits(x["hf"]) - logits(x[via + "_hf"])).abs().max().item() <= 1e-5


def test_megatron_mla_loads_the_output_at_three_layouts_and_gives_the_logits_of_transformers(chain):
    oks = chain["q_lora"]["oks"]
    loads = [o for o in oks if o.startswith("OK rank")]
    assert len(loads) == 12 and all("tensors equal" in o for o in loads), oks
    assert all("(48 expert weights)" in o for o in loads[8:]), oks  # TP=1 EP=1: 3 MoE layers x 8 experts x 2
    legacy = [o for o in oks if o.startswith("OK legacy")]
    assert len(legacy) == 4 and all("strict load_state_dict" in o for o in legacy), oks
    diffs = [float(o.rsplit("= ", 1)[1]) for o in oks if o.startswith("OK logits")]
    assert len(diffs) == 8 and max(diffs) <= 1e-4, oks


def test_torch_dist_keys_are_those_megatron_core_writes(chain):
    from reshard.formats.torch_dist import read_metadata

    def keys(path):
        return {k: tuple(getattr(m, "size", ())) for k, m in read_metadata(path)[0].state_dict_metadata.items()}

    x = chain["q_lora"]
    ours, mg = keys(os.path.join(x["td"], "release")), keys(os.path.join(x["mg"], "torch_dist", "iter_0000007"))
    # the Transformer-Engine spellings written beside the local spec's (MLA latent norms fused into the
    # up-projections, dense and MoE pre-MLP norms), so either spec loads the checkpoint
    te = {k for k in set(ours) - set(mg) if k.endswith(("linear_q_up_proj.layer_norm_weight",
                                                         "linear_kv_up_proj.layer_norm_weight",
                                                         "mlp.linear_fc1.layer_norm_weight"))}
    assert set(ours) - te == set(mg), (sorted(set(ours) - te - set(mg)), sorted(set(mg) - set(ours)))
    assert all(ours[k] == mg[k] for k in mg if not k.startswith(("embedding.", "output_layer.")))
    assert ours["decoder.layers.1.self_attention.linear_kv_down_proj.weight"] == (32 + 8, 64)  # [c_kv; k_rope]
    assert ours["decoder.layers.1.self_attention.linear_q_up_proj.weight"] == (4 * (16 + 8), 48)


def test_without_a_q_latent_the_query_comes_from_linear_q_proj_split_by_heads(chain):
    from tests.expected import read_dcp

    x = chain["no_q_lora"]
    tensors, _ = read_dcp(os.path.join(x["td"], "release"))
    assert tensors["decoder.layers.2.self_attention.linear_q_proj.weight"].shape == (4 * 24, 64)
    assert not any("q_down_proj" in k or "q_up_proj" in k or "q_layernorm" in k for k in tensors)
    local = torch.load(os.path.join(x["leg"], "release", "mp_rank_01_001_000", "model_optim_rng.pt"),
                       weights_only=False)["model"]
    assert local["decoder.layers.0.self_attention.linear_q_proj.weight"].shape == (48, 64)  # heads 2-3 of 4


def test_legacy_files_split_the_down_projections_only_under_the_local_spec(chain):
    x = chain["q_lora"]

    def model(d, sub):
        return torch.load(os.path.join(x[d], "release", sub, "model_optim_rng.pt"), weights_only=False)["model"]

    te, local = model("leg", "mp_rank_01_000_001"), model("leg_mc", "mp_rank_01_001")
    name = "decoder.layers.0.self_attention.linear_q_down_proj.weight"  # global layer 0 on stage 0 / layer 0
    assert te[name].shape == (48, 64)  # TE: a duplicated linear, whole on every TP rank
    assert local[name].shape == (24, 64)  # local spec: ColumnParallelLinear, rows 24..47 on TP rank 1
    assert "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight" in te
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in local
    args = torch.load(os.path.join(x["leg"], "release", "mp_rank_00_000_000", "model_optim_rng.pt"),
                      weights_only=False)["args"]
    assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank, args.moe_layer_freq) == \
        (True, 48, 32, [0, 1, 1, 1])
    assert (args.moe_router_num_groups, args.moe_router_group_topk, args.moe_router_topk_scaling_factor) == (2, 1, 2.5)


def test_multi_token_prediction_layers_are_named_and_refused(chain, tmp_path):
    src = str(tmp_path / "mtp")
    shutil.copytree(chain["q_lora"]["hf"], src)
    extra = {"model.layers.4.eh_proj.weight": torch.zeros(64, 128), "model.layers.4.enorm.weight": torch.ones(64)}
    save_file(extra, os.path.join(src, "mtp.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    out = str(tmp_path / "out")
    p = run_reshard([f"source.path={src}", f"target.path={out}", f"paths.root={tmp_path}"], check=False)
    assert p.returncode != 0
    assert "multi-token-prediction layer(s) [4]" in p.stdout + p.stderr and "refusing to drop them silently" in p.stdout + p.stderr
    assert not os.path.exists(out)


def test_an_fp8_deepseek_converts_to_bf16_torch_dist_equal_to_the_dequantized_weights(chain, tmp_path):
    from test_fp8 import quantize

    from tests.expected import read_dcp

    expected = quantize(chain["q_lora"]["hf"], str(tmp_path / "fp8"), block=(16, 16))
    ref = str(tmp_path / "dequantized")  # the dequantized weights as a plain bf16 HF checkpoint
    shutil.copytree(chain["q_lora"]["hf"], ref)
    for f in os.listdir(ref):
        if f.endswith(".safetensors"):
            p = os.path.join(ref, f)
            save_file({k: expected[k].to(torch.bfloat16) for k in load_file(p)}, p, metadata={"format": "pt"})
    outs = {}
    for name, src in (("fp8", tmp_path / "fp8"), ("ref", ref)):
        outs[name] = str(tmp_path / f"td_{name}")
        run_reshard([f"source.path={src}", f"target.path={outs[name]}", "parallel.target_tp=2", "parallel.target_ep=2",
                     "target.dtype=bfloat16", f"paths.root={tmp_path}", "launch.nproc=3"])
    a, _ = read_dcp(os.path.join(outs["fp8"], "release"))
    b, _ = read_dcp(os.path.join(outs["ref"], "release"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    stored = {}
    for f in os.listdir(tmp_path / "fp8"):
        if f.endswith(".safetensors"):
            stored.update(load_file(os.path.join(tmp_path / "fp8", f)))
    assert stored["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].shape == (2, 4)  # [32, 64] in 16x16


def test_the_spec_round_trips_through_transformers_and_megatron_args(chain):
    import dataclasses

    from reshard.formats.megatron import spec_from_args
    from reshard.formats.megatron_args import make_args
    from reshard.layout import Layout
    from reshard.spec import check_preset, read_hf_config, to_hf_config
    from reshard.synthetic import load_preset

    for v, preset in VARIANTS.items():
        p = load_preset(preset)
        detected = read_hf_config(chain[v]["hf"])
        assert check_preset(p, detected, "x") == dataclasses.replace(detected, name=preset)
        assert to_hf_config(p)["head_dim"] == 8 and to_hf_config(p)["first_k_dense_replace"] == 1
        again = spec_from_args(make_args(p, Layout(tp=2), torch.float32, "torch_dist"), "args", vocab_size=300)
        assert check_preset(p, again, "args").model_type == "deepseek_v3"


def test_inspect_names_the_latent_attention_the_dense_layers_and_the_routing(chain):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "reshard", "inspect", chain["q_lora"]["td"]], capture_output=True,
                       text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "multi-latent attention: q_lora 48, kv_lora 32, q/k head 16 + 8 rope, v head 16" in p.stdout
    assert "dense layers: [0] (the others MoE)" in p.stdout and "routing: sigmoid, best 1 of 2 groups, x2.5" in p.stdout
    assert "decoder.layers.3.mlp.experts.experts.linear_fc2.weight" in p.stdout


def test_vpp_uneven_pp_and_expert_tp_layouts_round_trip_on_3_ranks(chain, tmp_path):
    """legacy PP=2 x VPP=2 (one layer per model chunk, the dense layer alone in the first) -> torch_dist
    TP=2 EP=2 with expert-TP 1 and PP=3 of 1/2/1 layers -> HF: the source's tensors and logits."""
    from tests.expected import load_hf
    from tests.referees.hf_logits import logits

    x = chain["q_lora"]
    vpp, td, hf = (str(tmp_path / k) for k in ("vpp", "td", "hf"))
    run_jobs(3, [[f"source.path={x['hf']}", f"target.path={vpp}", "target.format=megatron_legacy", "parallel.target_pp=2",
               "parallel.target_vpp=2", "parallel.target_ep=2"],
              [f"source.path={vpp}", f"target.path={td}", "parallel.target_tp=2", "parallel.target_ep=2",
               "parallel.target_etp=1", "parallel.target_pp=3", "parallel.target_first_stage_layers=1",
               "parallel.target_last_stage_layers=1"],
              [f"source.path={td}", f"target.path={hf}", "target.format=hf"]], tmp_path, "layouts")
    f = torch.load(os.path.join(vpp, "release", "mp_rank_00_000_001", "model_optim_rng.pt"), weights_only=False)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in f["model0"]  # global layer 0: dense
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight" in f["model1"]  # global layer 2
    src, out = load_hf(x["hf"]), load_hf(hf)
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
    assert (logits(x["hf"]) - logits(hf)).abs().max().item() <= 1e-5


def test_yarn_rope_scaling_reaches_megatron_and_gives_the_logits_of_transformers(tmp_path):
    """DeepSeek-V3's published RoPE is YaRN (factor 40, mscale_all_dim 1): Megatron-core's MLA with
    rope_type=yarn and the same factor, mscale, mscale_all_dim and original length gives HF's logits."""
    hf = save_transformers_model("tiny_deepseek_v3_yarn", str(tmp_path / "hf"), max_shard_size="40KB")
    td = str(tmp_path / "td")
    run_reshard([f"source.path={hf}", f"target.path={td}", "parallel.target_tp=2", f"paths.root={tmp_path}",
                 "launch.nproc=2"])
    from reshard.formats import torch_dist

    ckpt = os.path.join(td, "release")
    args = torch_dist.read_common(ckpt, *torch_dist.read_metadata(ckpt))["args"]
    assert (args.rope_type, args.rotary_scaling_factor, args.mscale_all_dim, args.original_max_position_embeddings) \
        == ("yarn", 4.0, 1.0, 64)
    p = run_torchrun(2, [CHECK, os.path.join(td, "release"), hf, "2,1,1", "--logits"], timeout=600)
    diffs = [float(o.rsplit("= ", 1)[1]) for o in p.stdout.splitlines() if o.startswith("OK logits")]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, p.stdout
