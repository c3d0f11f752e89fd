"""Qwen3 (per-head q/k RMSNorm, heads x head_dim != hidden, tied embeddings) and Qwen3-MoE
(the same attention, routed experts with renormalised top-k, no shared expert), refereed by
transformers and by Megatron-core (``qk_layernorm=True``).

One chain per family, run once for the module (every launch is a real torchrun with gloo):

  transformers ``save_pretrained`` (several shards, norms perturbed away from 1)
    -> torch_dist TP=2 PP=2 (MoE: EP=2) and legacy TP=2 PP=2 (MoE: EP=2) on 3 ranks
    -> HF on 2 ranks from each -> transformers logits equal to the source's
  torch_dist -> Megatron-core GPTModel (local spec) ``dist_checkpointing.load`` at three layouts
    on 4 ranks, every tensor compared with the HF source mapped by hand, Megatron's own forward
    pass compared with transformers' at the layouts with PP=1; a legacy output written for the
    first layout loaded with a strict ``load_state_dict`` on each rank.
"""

import os
import re

import pytest
import torch

from conftest import REPO, run_jobs, run_torchrun, save_transformers_model

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")
FAMS = {"qwen3": "tiny_qwen3", "qwen3_moe": "tiny_qwen3_moe"}
# Megatron layouts (tp, pp, ep) the referee loads at, on 4 ranks; the first also gets a legacy file set
MCORE_LAYOUTS = {"qwen3": ["2,2,1", "2,1,1", "1,1,1"], "qwen3_moe": ["1,2,2", "2,1,2", "1,1,1"]}




@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    d = {fam: {k: str(root / fam / k) for k in ("td", "leg", "leg_mc", "td_hf", "leg_hf")} for fam in FAMS}
    for fam, preset in FAMS.items():
        d[fam]["hf"] = save_transformers_model(preset, str(root / fam / "hf"), max_shard_size="40KB")
    jobs = []
    for fam, x in d.items():
        ep = ["parallel.target_ep=2"] if fam == "qwen3_moe" else []
        tp, pp, mep = MCORE_LAYOUTS[fam][0].split(",")
        jobs += [
            [f"source.path={x['hf']}", f"target.path={x['td']}", "parallel.target_tp=2", "parallel.target_pp=2", *ep],
            [f"source.path={x['hf']}", f"target.path={x['leg']}", "target.format=megatron_legacy",
             "parallel.target_tp=2", "parallel.target_pp=2", *ep],
            # the referee's first layout, local-spec names: for a strict load_state_dict by Megatron
            [f"source.path={x['td']}", f"target.path={x['leg_mc']}", "target.format=megatron_legacy",
             f"parallel.target_tp={tp}", f"parallel.target_pp={pp}", f"parallel.target_ep={mep}",
             "target.transformer_impl=local"],
        ]
    run_jobs(3, jobs, root, "to_megatron")
    run_jobs(2, [[f"source.path={x[src]}", f"target.path={x[src + '_hf']}", "target.format=hf"]
              for x in d.values() for src in ("td", "leg")], root, "to_hf")
    for fam, x in d.items():
        p = run_torchrun(4, [CHECK, os.path.join(x["td"], "release"), x["hf"], *MCORE_LAYOUTS[fam],
                             "--legacy", os.path.join(x["leg_mc"], "release"), "--logits"], timeout=900)
        x["oks"] = [line for line in p.stdout.splitlines() if line.startswith("OK")]
    return d


def _hf_tensors(path):
    from tests.expected import load_hf

    return load_hf(path)


@pytest.mark.parametrize("via", ["td", "leg"])
@pytest.mark.parametrize("fam", list(FAMS))
def test_hf_through_a_megatron_format_and_back_gives_the_source_logits(chain, fam, via):
    from tests.referees.hf_logits import logits

    x = chain[fam]
    src, out = _hf_tensors(x["hf"]), _hf_tensors(x[via + "_hf"])
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
    la, lb = logits(x["hf"]), logits(x[via + "_hf"])
    assert la.shape == (2, 12, 300) and (la - lb).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fam", list(FAMS))
def test_megatron_loads_the_torch_dist_output_at_three_layouts_every_tensor_equal(chain, fam):
    oks = [o for o in chain[fam]["oks"] if o.startswith("OK rank")]
    assert len(oks) == 12 and all("tensors equal" in o for o in oks), oks
    heads = sorted(o.split(":")[0].split(" tp ")[1] for o in oks[:4])
    if fam == "qwen3":
        assert heads == ["0 pp 0 ep 0", "0 pp 1 ep 0", "1 pp 0 ep 0", "1 pp 1 ep 0"]
        # TP=1 PP=1: 4 layers x 8 (two norms, qkv, q/k norms, proj, fc1, fc2) + embedding + final norm; tied
        assert all(": 34 tensors equal" in o for o in oks[8:]), oks
    else:
        assert heads == ["0 pp 0 ep 0", "0 pp 0 ep 1", "0 pp 1 ep 0", "0 pp 1 ep 1"]
        # every expert of every layer on each of the 4 DP replicas at TP=1 EP=1
        assert all("(64 expert weights)" in o for o in oks[8:]), oks


@pytest.mark.parametrize("fam", list(FAMS))
def test_megatron_forward_gives_the_logits_of_transformers(chain, fam):
    lines = [o for o in chain[fam]["oks"] if o.startswith("OK logits")]
    assert len(lines) == 8, chain[fam]["oks"]  # 4 ranks at each of the two PP=1 layouts
    diffs = [float(re.search(r"= ([0-9.e+-]+)$", o).group(1)) for o in lines]
    assert max(diffs) <= 1e-4, lines


@pytest.mark.parametrize("fam", list(FAMS))
def test_legacy_files_load_strictly_into_megatron(chain, fam):
    lines = [o for o in chain[fam]["oks"] if o.startswith("OK legacy")]
    assert len(lines) == 4 and all("strict load_state_dict" in o for o in lines), chain[fam]["oks"]


def test_q_k_norms_are_replicated_and_heads_times_head_dim_is_not_hidden(chain):
    from tests.expected import read_dcp

    x = chain["qwen3"]
    src = _hf_tensors(x["hf"])
    tensors, _ = read_dcp(os.path.join(x["td"], "release"))
    q = tensors["decoder.layers.self_attention.q_layernorm.weight"]
    assert q.shape == (4, 32)  # [layers, head_dim]: one norm shared by the 4 heads of a layer
    assert torch.equal(q[3], src["model.layers.3.self_attn.q_norm.weight"])
    assert tensors["decoder.layers.self_attention.linear_qkv.weight"].shape == (4, (4 + 2 * 2) * 32, 64)
    assert tensors["decoder.layers.self_attention.linear_proj.weight"].shape == (4, 64, 128)
    it = os.path.join(x["leg"], "release")
    for t in range(2):
        f = torch.load(os.path.join(it, f"mp_rank_{t:02d}_001", "model_optim_rng.pt"), weights_only=False)
        assert f["args"].qk_layernorm is True and f["args"].kv_channels == 32
        k = f["model"]["decoder.layers.1.self_attention.k_layernorm.weight"]  # global layer 3
        assert torch.equal(k, src["model.layers.3.self_attn.k_norm.weight"])  # the whole norm on each TP rank
        assert f["model"]["decoder.layers.1.self_attention.linear_proj.weight"].shape == (64, 64)


def test_the_spec_detected_from_transformers_and_from_megatron_args_equals_the_preset(chain):
    import dataclasses

    from reshard.formats.megatron import spec_from_args
    from reshard.formats.megatron_args import make_args
    from reshard.layout import Layout
    from reshard.spec import check_preset, read_hf_config
    from reshard.synthetic import load_preset

    for fam, preset in FAMS.items():
        detected, p = read_hf_config(chain[fam]["hf"]), load_preset(preset)
        assert check_preset(p, detected, "x") == dataclasses.replace(detected, name=preset)
        assert detected.qk_norm and detected.head_dim == 32 and detected.hidden_size == 64
        args = make_args(p, Layout(tp=2, pp=2), torch.float32, "torch_dist")
        again = spec_from_args(args, "args", vocab_size=p.vocab_size)
        assert again.model_type == fam and check_preset(p, again, "args").model_type == fam


def test_qwen3_moe_expert_count_is_read_under_either_spelling():
    from reshard.spec import spec_from_hf_config, to_hf_config
    from reshard.synthetic import load_preset

    cfg = to_hf_config(load_preset("tiny_qwen3_moe"))
    assert spec_from_hf_config(cfg).num_experts == 8  # Qwen's own configs: num_experts
    cfg["num_local_experts"] = cfg.pop("num_experts")  # what transformers 5 writes
    assert spec_from_hf_config(cfg).num_experts == 8
    del cfg["num_local_experts"]
    from reshard.errors import SourceError

    with pytest.raises(SourceError, match="num_experts"):
        spec_from_hf_config(cfg)


def test_a_qwen3_moe_spec_with_a_shared_expert_is_refused():
    import dataclasses

    from reshard.errors import ConfigError
    from reshard.spec import ModelSpec
    from reshard.synthetic import load_preset

    d = dataclasses.asdict(load_preset("tiny_qwen3_moe"))
    d["shared_expert_ffn_hidden_size"] = 64
    with pytest.raises(ConfigError, match="qwen3_moe has no shared expert"):
        ModelSpec.from_dict(d)
