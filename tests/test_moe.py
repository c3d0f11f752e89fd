"""Mixture of experts: Mixtral and Qwen2-MoE (routed experts + gated shared expert) in every
Megatron format, with expert parallelism, refereed by Megatron-core and transformers.

One chain per family, run once for the module (every launch is a real torchrun with gloo):

  transformers ``save_pretrained`` (several shards)
    -> torch_dist TP=2 EP=2 on 3 ranks
    -> Megatron-core MoE GPTModel (local spec, SequentialMLP experts, allgather dispatcher)
       ``dist_checkpointing.load`` at TP=1 EP=2, at TP=2 EP=1 and at TP=2 EP=2 with expert-TP 1,
       every tensor compared with
       the HF source mapped by hand; the loaded model is then saved by Megatron itself
       (``dist_checkpointing.save`` + legacy ``state_dict()`` files) as a Megatron-made source
    -> legacy PP=2 EP=2 on 2 ranks (Mixtral: SequentialMLP names; Qwen2-MoE: TE grouped GEMM)
    -> HF on 2 ranks -> transformers logits equal to the source's.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, read_json, run_jobs, run_reshard, run_torchrun, save_transformers_model

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")
MOE = {"mixtral": "tiny_mixtral", "qwen2_moe": "tiny_qwen2_moe"}




def _old_grouped_mlp(src, dst):
    """Megatron's removed GroupedMLP form of a SequentialMLP legacy checkpoint: per layer
    ``mlp.experts.weight1`` ``[h, E_local*2f]`` and ``weight2`` ``[E_local*f, h]`` (transposed)."""
    shutil.copytree(src, dst)
    for dirpath, _, files in os.walk(dst):
        if "model_optim_rng.pt" not in files:
            continue
        path = os.path.join(dirpath, "model_optim_rng.pt")
        obj = torch.load(path, weights_only=False)
        model, out, fc = obj["model"], {}, {}
        for k, v in model.items():
            if ".mlp.experts.local_experts." in k:
                pre, rest = k.split(".mlp.experts.local_experts.")
                j, name = rest.split(".", 1)
                if name.endswith(".weight"):
                    fc.setdefault((pre, name), {})[int(j)] = v
                continue
            out[k] = v
        for (pre, name), per in fc.items():
            ws = [per[j] for j in sorted(per)]
            if name == "linear_fc1.weight":
                out[f"{pre}.mlp.experts.weight1"] = torch.cat([w.t() for w in ws], dim=1).contiguous()
            else:
                out[f"{pre}.mlp.experts.weight2"] = torch.cat([w.t() for w in ws], dim=0).contiguous()
        obj["model"] = out
        torch.save(obj, path)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    d = {fam: {"hf": save_transformers_model(preset, str(root / fam / "hf"), max_shard_size="40KB")}
         for fam, preset in MOE.items()}
    for fam, x in d.items():
        x.update({k: str(root / fam / k) for k in ("td", "leg", "hf2", "mg", "mg_leg_hf", "mg_td_hf", "leg_ep2")})
    run_jobs(3, [[f"source.path={x['hf']}", f"target.path={x['td']}", "parallel.target_tp=2", "parallel.target_ep=2"]
              for x in d.values()] + [
        # for a strict load_state_dict by Megatron's local spec at TP=1 EP=2
        [f"source.path={d['mixtral']['td']}", f"target.path={d['mixtral']['leg_ep2']}", "target.format=megatron_legacy",
         "parallel.target_ep=2", "target.transformer_impl=local"]], root, "to_td")
    for fam, x in d.items():
        legacy = ["--legacy", os.path.join(x["leg_ep2"], "release")] if fam == "mixtral" else []
        p = run_torchrun(2, [CHECK, os.path.join(x["td"], "release"), x["hf"], "1,1,2", "2,1,1", "2,1,2,1",
                             "--resave", x["mg"], *legacy], timeout=600)
        x["megatron"] = [line for line in p.stdout.splitlines() if line.startswith("OK rank")]
        x["megatron_legacy"] = [line for line in p.stdout.splitlines() if line.startswith("OK legacy")]
    mx = d["mixtral"]
    _old_grouped_mlp(os.path.join(mx["mg"], "legacy"), str(root / "old_form"))
    mx["old_hf"] = str(root / "old_form_hf")
    jobs = [
        [f"source.path={mx['td']}", f"target.path={mx['leg']}", "target.format=megatron_legacy",
         "parallel.target_pp=2", "parallel.target_ep=2", "target.transformer_impl=local"],
        [f"source.path={d['qwen2_moe']['td']}", f"target.path={d['qwen2_moe']['leg']}", "target.format=megatron_legacy",
         "parallel.target_pp=2", "parallel.target_ep=2", "target.moe_grouped_gemm=true"],
    ]
    jobs += [[f"source.path={x['leg']}", f"target.path={x['hf2']}", "target.format=hf"] for x in d.values()]
    jobs += [[f"source.path={os.path.join(mx['mg'], 'legacy')}", f"target.path={mx['mg_leg_hf']}",
              "target.format=hf", "+model=tiny_mixtral"],
             [f"source.path={os.path.join(d['qwen2_moe']['mg'], 'torch_dist')}",
              f"target.path={d['qwen2_moe']['mg_td_hf']}", "target.format=hf", "+model=tiny_qwen2_moe"],
             [f"source.path={root / 'old_form'}", f"target.path={mx['old_hf']}", "target.format=hf",
              "+model=tiny_mixtral"]]
    run_jobs(2, jobs, root, "rest")
    return d


@pytest.mark.parametrize("fam", list(MOE))
def test_torch_dist_tp2_ep2_loads_in_megatron_at_ep2_and_ep1(chain, fam):
    oks = chain[fam]["megatron"]
    # 2 ranks at TP=1 EP=2 (each holds 4 of the 8 experts of 4 layers), then 2 ranks at TP=2 EP=1
    ep2 = sorted(o.split(":")[0] for o in oks if "(32 expert weights)" in o and "etp" not in o)
    ep1 = sorted(o.split(":")[0] for o in oks if "(64 expert weights)" in o)
    assert ep2 == ["OK rank 0 tp 0 pp 0 ep 0", "OK rank 1 tp 0 pp 0 ep 1"], oks
    assert ep1 == ["OK rank 0 tp 0 pp 0 ep 0", "OK rank 1 tp 1 pp 0 ep 0"], oks
    # TP=2 with whole experts (expert-TP 1) over EP=2: the same checkpoint, another expert split
    etp1 = sorted(o.split(":")[0] for o in oks if "etp 1" in o)
    assert etp1 == ["OK rank 0 tp 0 pp 0 ep 0 etp 1", "OK rank 1 tp 1 pp 0 ep 1 etp 1"], oks
    # the whole source went through: every tensor Megatron holds was compared
    assert len(oks) == 6 and all("tensors equal" in o for o in oks)


def test_legacy_ep2_files_load_strictly_into_megatron(chain):
    """SequentialMLP names with local expert indices, _extra_state entries, the router: exactly the
    state_dict() of a Megatron-core MoE GPTModel (local spec) at TP=1 EP=2, values equal to the source."""
    oks = sorted(chain["mixtral"]["megatron_legacy"])
    assert [o.split(":")[0] for o in oks] == ["OK legacy mp_rank_00_000 rank 0", "OK legacy mp_rank_00_001 rank 1"], oks
    assert all("55 tensors equal" in o for o in oks)


def _logits_equal(a, b):
    from tests.referees.hf_logits import logits

    la, lb = logits(a), logits(b)
    assert la.shape == lb.shape
    diff = (la - lb).abs().max().item()
    assert diff <= 1e-5, diff
    return diff


@pytest.mark.parametrize("fam", list(MOE))
def test_legacy_pp2_ep2_then_hf_gives_the_source_logits(chain, fam):
    x = chain[fam]
    it = os.path.join(x["leg"], "release")
    assert sorted(os.listdir(it)) == [f"mp_rank_00_{p:03d}_{e:03d}" for p in range(2) for e in range(2)]
    model = torch.load(os.path.join(it, "mp_rank_00_001_001", "model_optim_rng.pt"), weights_only=False)
    args, model = model["args"], model["model"]
    assert (args.num_experts, args.expert_model_parallel_size, args.pipeline_model_parallel_size) == (8, 2, 2)
    names = set(model)
    if fam == "mixtral":  # SequentialMLP: local expert indices 0..3 on EP rank 1 (global experts 4..7)
        assert {f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight" for j in range(4)} <= names
        assert not any("local_experts.4" in n for n in names)
    else:  # TE grouped GEMM names, and the shared expert with its gate
        assert {f"decoder.layers.1.mlp.experts.linear_fc2.weight{j}" for j in range(4)} <= names
        assert "decoder.layers.0.mlp.shared_experts.gate_weight" in names
    assert model["decoder.layers.0.mlp.router.weight"].shape == (8, 64)
    # expert 5 of layer 3 = local expert 1 of EP rank 1, local layer 1 of stage 1
    hf = {}
    for f in os.listdir(x["hf"]):
        if f.endswith(".safetensors"):
            hf.update(load_file(os.path.join(x["hf"], f)))
    down = hf["model.layers.3.block_sparse_moe.experts.5.w2.weight" if fam == "mixtral"
              else "model.layers.3.mlp.experts.5.down_proj.weight"]
    got = model["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight" if fam == "mixtral"
                else "decoder.layers.1.mlp.experts.linear_fc2.weight1"]
    assert torch.equal(got, down)
    _logits_equal(x["hf"], x["hf2"])


def test_megatron_made_moe_checkpoints_convert_to_the_source_model(chain):
    """Megatron's own legacy files (EP=2: mp_rank_00_000/_001) and its dist_checkpointing.save."""
    assert sorted(os.listdir(os.path.join(chain["mixtral"]["mg"], "legacy", "iter_0000007"))) == [
        "mp_rank_00_000", "mp_rank_00_001"]
    _logits_equal(chain["mixtral"]["hf"], chain["mixtral"]["mg_leg_hf"])
    _logits_equal(chain["qwen2_moe"]["hf"], chain["qwen2_moe"]["mg_td_hf"])


def test_the_old_transposed_grouped_mlp_form_is_read(chain):
    _logits_equal(chain["mixtral"]["hf"], chain["mixtral"]["old_hf"])


# --------------------------------------------------------------------------- missing experts

def test_an_expert_absent_from_the_hf_index_is_named_and_nothing_is_written(chain, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(chain["mixtral"]["hf"], src)
    idx = read_json(src / "model.safetensors.index.json")
    for w in ("w1", "w2", "w3"):
        del idx["weight_map"][f"model.layers.2.block_sparse_moe.experts.6.{w}.weight"]
    with open(src / "model.safetensors.index.json", "w") as f:
        json.dump(idx, f)
    out = tmp_path / "out"
    p = run_reshard([f"source.path={src}", f"target.path={out}", "parallel.target_ep=2"], check=False)
    assert p.returncode != 0
    assert "missing experts (1): layer 2 expert 6" in p.stderr + p.stdout, p.stderr[-3000:]
    assert not out.exists() and not any(n.startswith(".reshard") for n in os.listdir(tmp_path))


def test_an_absent_expert_parallel_rank_directory_is_named(chain, tmp_path):
    src = tmp_path / "leg"
    shutil.copytree(chain["mixtral"]["leg"], src)
    shutil.rmtree(src / "release" / "mp_rank_00_001_001")
    out = tmp_path / "out"
    p = run_reshard([f"source.path={src}", f"target.path={out}", "target.format=hf"], check=False)
    assert p.returncode != 0
    msg = p.stderr + p.stdout
    assert "missing: mp_rank_00_001_001" in msg and "missing experts: 4..7 (EP rank 1)" in msg, msg[-3000:]
    assert not out.exists()


# --------------------------------------------------------------------------- dtypes

def test_the_router_keeps_its_dtype_unless_a_cast_is_asked(chain, tmp_path):
    """Megatron keeps the router in fp32 in a bf16 model: a bf16 source with an fp32 router
    keeps it fp32; target.dtype casts everything."""
    src = tmp_path / "hf"
    shutil.copytree(chain["mixtral"]["hf"], src)
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            t = load_file(str(src / f))
            save_file({k: v if ".gate." in k else v.to(torch.bfloat16) for k, v in t.items()}, str(src / f),
                      metadata={"format": "pt"})
    from torch.distributed.checkpoint import FileSystemReader

    for extra, router in (([], torch.float32), (["target.dtype=bfloat16"], torch.bfloat16)):
        out = tmp_path / f"td{len(extra)}"
        run_reshard([f"source.path={src}", f"target.path={out}", "parallel.target_ep=2", *extra])
        md = FileSystemReader(str(out / "release")).read_metadata().state_dict_metadata
        assert md["decoder.layers.mlp.router.weight"].properties.dtype == router
        assert tuple(md["decoder.layers.mlp.router.weight"].size) == (4, 8, 64)
        ex = md["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
        assert ex.properties.dtype == torch.bfloat16 and tuple(ex.size) == (4, 8, 192, 64)
        # the MoE pre-MLP norm under the TE spec's key and the local spec's
        assert "decoder.layers.pre_mlp_layernorm.weight" in md
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in md
        assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_3.7_4.8" in md


# --------------------------------------------------------------------------- specs, tables, layouts

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_cfg")
    return {fam: save_transformers_model(preset, str(root / fam)) for fam, preset in MOE.items()}


@pytest.mark.parametrize("fam", list(MOE))
def test_the_spec_detected_from_transformers_equals_the_preset(saved, fam):
    from reshard.spec import check_preset, read_hf_config
    from reshard.synthetic import load_preset

    detected, preset = read_hf_config(saved[fam]), load_preset(MOE[fam])
    assert check_preset(preset, detected, "x").num_experts == 8
    assert detected.expert_ffn == preset.expert_ffn
    assert detected.moe_norm_topk_prob == (fam == "mixtral")
    assert detected.shared_expert_gate == (fam == "qwen2_moe")


def test_a_preset_with_another_expert_count_is_refused(saved):
    import dataclasses

    from reshard.errors import ConfigError
    from reshard.spec import check_preset, read_hf_config
    from reshard.synthetic import load_preset

    wrong = dataclasses.replace(load_preset("tiny_mixtral"), num_experts=4)
    with pytest.raises(ConfigError, match="num_experts: preset 4, checkpoint 8"):
        check_preset(wrong, read_hf_config(saved["mixtral"]), "x")


def test_expert_entries_expand_per_expert_and_every_tensor_is_mapped(saved):
    from reshard.models import table_for
    from reshard.spec import read_hf_config

    for fam, path in saved.items():
        spec = read_hf_config(path)
        names = table_for(spec).canonical_names(spec)
        on_disk = set()
        for f in os.listdir(path):
            if f.endswith(".safetensors"):
                on_disk |= set(load_file(os.path.join(path, f)))
        assert set(names) == on_disk, set(names) ^ on_disk
        experts = {e.expert for e, _, _ in names.values() if e.expert is not None}
        assert experts == set(range(8))


def test_moe_layouts_that_do_not_divide_are_named():
    from reshard.errors import LayoutError
    from reshard.layout import Layout
    from reshard.synthetic import load_preset

    spec = load_preset("tiny_qwen2_moe")  # 8 experts, expert ffn 32, shared ffn 64
    assert Layout(tp=2, ep=4).problems(spec) == []
    assert any("num_experts=8 is not divisible by ep=3" in p for p in Layout(ep=3).problems(spec))
    assert any("moe_ffn_hidden_size=32 is not divisible by expert tp=64" in p
               for p in Layout(tp=1, etp=64).problems(spec))
    dense = load_preset("tiny_llama3")
    with pytest.raises(LayoutError, match="apply to mixture-of-experts models"):
        Layout(ep=2).check(dense)


def test_megatron_args_round_trip_the_moe_spec():
    import dataclasses

    from reshard.formats.megatron import layout_from_args, spec_from_args
    from reshard.formats.megatron_args import make_args
    from reshard.layout import Layout
    from reshard.synthetic import load_preset

    for preset in MOE.values():
        spec = load_preset(preset)
        layout = Layout(tp=2, pp=2, ep=4)
        args = make_args(spec, layout, torch.float32, "torch")
        got = spec_from_args(args, "x", spec.vocab_size)
        assert dataclasses.replace(got, max_position_embeddings=spec.max_position_embeddings,
                                   name=spec.name) == spec
        assert layout_from_args(args, spec) == layout


def test_hf_and_meta_targets_refuse_what_they_cannot_hold(tmp_path):
    import dataclasses

    from reshard.spec import hf_problems
    from reshard.synthetic import load_preset

    spec = load_preset("tiny_mixtral")
    assert hf_problems(spec) == []
    bias = dataclasses.replace(spec, moe_expert_bias=True)
    assert hf_problems(bias) == ["MixtralForCausalLM has no router expert bias"]
    assert "Mixtral has no shared expert" in hf_problems(dataclasses.replace(spec, shared_expert_ffn_hidden_size=64))
    assert hf_problems(dataclasses.replace(spec, moe_router_score_function="sigmoid")) == [
        "MixtralForCausalLM routes with softmax, the checkpoint with sigmoid"]


def _inject_expert_bias(src, dst):
    """A Megatron legacy MoE checkpoint with aux-loss-free balancing: ``mlp.router.expert_bias``
    ``[E]`` (fp32, a buffer Megatron checkpoints) per layer, sigmoid routing in ``args``."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(5)
    bias = {i: torch.randn(8, generator=g) for i in range(4)}
    for dirpath, _, files in os.walk(dst):
        if "model_optim_rng.pt" in files:
            path = os.path.join(dirpath, "model_optim_rng.pt")
            obj = torch.load(path, weights_only=False)
            obj["args"].moe_router_enable_expert_bias = True
            obj["args"].moe_router_score_function = "sigmoid"
            obj["model"] = {**obj["model"], **{f"decoder.layers.{i}.mlp.router.expert_bias": b
                                               for i, b in bias.items()}}
            torch.save(obj, path)
    return bias


def test_the_router_expert_bias_is_kept_through_both_megatron_formats(chain, tmp_path):
    src = tmp_path / "bias"
    bias = _inject_expert_bias(os.path.join(chain["mixtral"]["mg"], "legacy"), src)
    td, leg = tmp_path / "td", tmp_path / "leg"
    run_jobs(2, [[f"source.path={src}", f"target.path={td}", "parallel.target_tp=2", "+model=tiny_mixtral",
               "model.moe_expert_bias=true", "model.moe_router_score_function=sigmoid"],
              [f"source.path={td}", f"target.path={leg}", "target.format=megatron_legacy", "parallel.target_pp=2",
               "parallel.target_ep=4"]], tmp_path, "bias")
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(td / "release")).read_metadata().state_dict_metadata
    assert tuple(md["decoder.layers.mlp.router.expert_bias"].size) == (4, 8)
    assert md["decoder.layers.mlp.router.expert_bias"].properties.dtype == torch.float32
    # layer 3 = local layer 1 of stage 1; every EP rank's file holds the (replicated) router and its bias
    obj = torch.load(os.path.join(leg, "release", "mp_rank_00_001_003", "model_optim_rng.pt"), weights_only=False)
    assert torch.equal(obj["model"]["decoder.layers.1.mlp.router.expert_bias"], bias[3])
    assert obj["args"].moe_router_enable_expert_bias and obj["args"].moe_router_score_function == "sigmoid"
    out = tmp_path / "hf"
    p = run_reshard([f"source.path={leg}", f"target.path={out}", "target.format=hf"], check=False)
    assert p.returncode != 0 and "MixtralForCausalLM has no router expert bias" in p.stderr + p.stdout
    assert "routes with softmax, the checkpoint with sigmoid" in p.stderr + p.stdout
    assert not out.exists()
