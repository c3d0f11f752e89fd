"""Models that mix dense and MoE layers (HF Qwen-MoE ``mlp_only_layers`` / ``decoder_sparse_step``,
Megatron ``moe_layer_freq`` as a list; DeepSeek's ``first_k_dense_replace`` is the same pattern).

Megatron-core stops stacking torch_dist keys on a layer axis for such models: every layer tensor
is ``decoder.layers.{i}.<name>`` (experts ``[E, ...]``), and a dense layer's pre-MLP norm is fused
into its fc1. One chain, run once for the module (every launch a real torchrun with gloo):

  transformers ``save_pretrained`` of a tiny Qwen2-MoE with layers 0 and 3 dense
    -> torch_dist TP=2 PP=2 EP=2 on 3 ranks -> legacy TP=1 PP=2 EP=2 (local names) on 3 ranks
    -> HF on 2 ranks from each -> transformers logits equal to the source's
  torch_dist -> Megatron-core GPTModel built from its own block spec for ``moe_layer_freq=[0,1,1,0]``
    loads it at three layouts on 4 ranks (every tensor equal, its logits equal transformers'),
    strict-loads the legacy files, and re-saves both formats itself -> reshard reads those back to HF.
"""

import os

import pytest
import torch

from conftest import REPO, run_jobs, run_torchrun, save_transformers_model

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")
PRESET = "tiny_qwen2_moe_mixed"




@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    x = {k: str(root / k) for k in ("td", "leg", "td_hf", "leg_hf", "mg", "mg_td_hf", "mg_leg_hf")}
    x["hf"] = save_transformers_model(PRESET, str(root / "hf"), max_shard_size="40KB")
    run_jobs(3, [[f"source.path={x['hf']}", f"target.path={x['td']}", "parallel.target_tp=2", "parallel.target_pp=2",
               "parallel.target_ep=2"]], root, "to_td")
    run_jobs(3, [[f"source.path={x['td']}", f"target.path={x['leg']}", "target.format=megatron_legacy",
               "parallel.target_pp=2", "parallel.target_ep=2", "target.transformer_impl=local"]], root, "to_leg")
    p = run_torchrun(4, [CHECK, os.path.join(x["td"], "release"), x["hf"], "1,2,2", "2,1,2", "1,1,1",
                         "--legacy", os.path.join(x["leg"], "release"), "--resave", x["mg"], "--logits"], timeout=900)
    x["oks"] = [line for line in p.stdout.splitlines() if line.startswith("OK")]
    run_jobs(2, [[f"source.path={x['td']}", f"target.path={x['td_hf']}", "target.format=hf"],
              [f"source.path={x['leg']}", f"target.path={x['leg_hf']}", "target.format=hf"],
              # Megatron's own files: its args hold only the padded vocab, so the preset names the model
              [f"source.path={os.path.join(x['mg'], 'torch_dist')}", f"target.path={x['mg_td_hf']}",
               "target.format=hf", f"+model={PRESET}"],
              [f"source.path={os.path.join(x['mg'], 'legacy')}", f"target.path={x['mg_leg_hf']}",
               "target.format=hf", f"+model={PRESET}"]], root, "to_hf")
    return x


def _dcp_keys(path):
    from reshard.formats.torch_dist import read_metadata

    md, _ = read_metadata(path)
    return {k: tuple(getattr(v, "size", ())) for k, v in md.state_dict_metadata.items()}


@pytest.mark.parametrize("out", ["td_hf", "leg_hf", "mg_td_hf", "mg_leg_hf"])
def test_every_route_back_to_hf_gives_the_source_logits(chain, out):
    from tests.expected import load_hf
    from tests.referees.hf_logits import logits

    src, got = load_hf(chain["hf"]), load_hf(chain[out])
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)
    assert "model.layers.0.mlp.gate_proj.weight" in got and "model.layers.1.mlp.experts.7.up_proj.weight" in got
    assert not any(k.startswith(("model.layers.0.mlp.experts.", "model.layers.3.mlp.gate.")) for k in got)
    assert (logits(chain["hf"]) - logits(chain[out])).abs().max().item() <= 1e-5


def test_torch_dist_keys_are_per_layer_as_megatron_core_writes_them(chain):
    ours = _dcp_keys(os.path.join(chain["td"], "release"))
    megatron = _dcp_keys(os.path.join(chain["mg"], "torch_dist", "iter_0000007"))  # saved by Megatron-core
    # the MoE layers' pre-MLP norm is also written under the TE spec's name (pre_mlp_layernorm.weight)
    extra = {k for k in set(ours) - set(megatron) if k.endswith(".pre_mlp_layernorm.weight")}
    assert sorted(extra) == ["decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.2.pre_mlp_layernorm.weight"]
    assert set(ours) - extra == set(megatron)
    assert all(ours[k] == megatron[k] for k in megatron if not k.startswith(("embedding.", "output_layer.")))
    assert ours["decoder.layers.0.mlp.linear_fc1.weight"] == (256, 64)  # dense: [W; V] of ffn 128
    assert ours["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (8, 64, 64)  # [E, 2*32, h]
    assert not any(k.startswith("decoder.layers.self_attention") for k in ours)  # nothing stacked


def test_megatron_loads_the_output_at_three_layouts_and_its_logits_are_transformers(chain):
    oks = chain["oks"]
    loads = [o for o in oks if o.startswith("OK rank")]
    assert len(loads) == 12 and all("tensors equal" in o for o in loads), oks
    # TP=1 EP=1 PP=1: 2 MoE layers x 16 expert weights on each of the 4 replicas
    assert all("(32 expert weights)" in o for o in loads[8:]), oks
    legacy = [o for o in oks if o.startswith("OK legacy")]
    assert len(legacy) == 4 and all("strict load_state_dict" in o for o in legacy), oks
    diffs = [float(o.rsplit("= ", 1)[1]) for o in oks if o.startswith("OK logits")]
    assert len(diffs) == 8 and max(diffs) <= 1e-4, oks


def test_legacy_files_hold_a_dense_mlp_in_dense_layers_and_experts_in_the_others(chain):
    f = torch.load(os.path.join(chain["leg"], "release", "mp_rank_00_001_001", "model_optim_rng.pt"),
                   weights_only=False)
    assert f["args"].moe_layer_freq == [0, 1, 1, 0]
    model = f["model"]  # stage 1: global layers 2 (MoE) and 3 (dense), local 0 and 1
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in model
    assert "decoder.layers.1.mlp.linear_fc1.weight" in model and "decoder.layers.1.pre_mlp_layernorm.weight" in model
    assert not any(k.startswith("decoder.layers.1.mlp.experts") or k.startswith("decoder.layers.1.mlp.router")
                   for k in model)


@pytest.mark.parametrize("freq,dense", [
    (1, ()), (2, (1, 3)), ([0, 1, 1, 0], (0, 3)), ("[0,1,1,0]", (0, 3)), ("([0]*1+[1]*2+[0])", (0, 3)),
])
def test_megatron_moe_layer_freq_in_every_form(freq, dense):
    from reshard.formats.megatron import _dense_layers

    assert _dense_layers(freq, 4, "args") == dense


def test_a_bad_moe_layer_freq_is_named():
    from reshard.errors import SourceError
    from reshard.formats.megatron import _dense_layers

    with pytest.raises(SourceError, match="one 0/1 per layer"):
        _dense_layers([0, 1, 1], 4, "args")
    with pytest.raises(SourceError, match="neither an integer nor a list"):
        _dense_layers("__import__('os')", 4, "args")


def test_hf_decoder_sparse_step_and_mlp_only_layers_make_the_dense_layers():
    from reshard.spec import spec_from_hf_config, to_hf_config
    from reshard.synthetic import load_preset

    cfg = to_hf_config(load_preset("tiny_qwen2_moe"))
    cfg.update(decoder_sparse_step=2, mlp_only_layers=[])
    assert spec_from_hf_config(cfg).dense_layers == (0, 2)  # sparse iff (i + 1) % step == 0
    cfg.update(decoder_sparse_step=1, mlp_only_layers=[3, 0])
    spec = spec_from_hf_config(cfg)
    assert spec.dense_layers == (0, 3) and spec.is_moe_layer(1) and not spec.is_moe_layer(3)
    assert to_hf_config(spec)["mlp_only_layers"] == [0, 3]


def test_dense_layers_that_are_not_some_layers_of_an_moe_model_are_refused():
    import dataclasses

    from reshard.errors import ConfigError
    from reshard.spec import ModelSpec, hf_problems
    from reshard.synthetic import load_preset

    d = dataclasses.asdict(load_preset("tiny_qwen2_moe"))
    for bad in ([4], [0, 1, 2, 3]):
        with pytest.raises(ConfigError, match="must name some, not all"):
            ModelSpec.from_dict(dict(d, dense_layers=bad))
    mixtral = dataclasses.replace(load_preset("tiny_mixtral"), dense_layers=(0,))
    assert "Mixtral has no dense layers" in hf_problems(mixtral)
