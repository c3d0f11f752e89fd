"""Megatron-FSDP ``fsdp_dtensor`` (FORMATS.md §10), both directions.

A Megatron-core-made torch_dist checkpoint (Megatron loads reshard's conversion of a transformers model at
TP=2 PP=2 and re-saves it with ``dist_checkpointing.save``) -> fsdp_dtensor on 3 ranks -> torch_dist at
TP=4, which Megatron-core loads with every tensor equal to the HF source and transformers' logits. The
fsdp_dtensor keys and shapes are compared with Megatron-LM's converter rules applied to the Megatron-made
key list (``tests/expected.py::fsdp_keys_from_torch_dist``); the tensors are read back with plain DCP.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_jobs, run_reshard, run_torchrun, save_transformers_model
from tests.expected import fsdp_keys_from_torch_dist, load_hf, read_dcp

CHECK = os.path.join(REPO, "tests", "referees", "check_mcore_load.py")
MODELS = {"llama3": "tiny_llama3", "mixtral": "tiny_mixtral"}


def _dcp_shapes(ckpt):
    from reshard.formats.dcp_metadata import TensorStorageMetadata
    from reshard.formats.torch_dist import read_metadata

    md, _ = read_metadata(ckpt)
    return {k: tuple(m.size) for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


@pytest.fixture(scope="module")
def chain(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    d = {"llama3": {"hf": hf_models["llama3"]},
         "mixtral": {"hf": save_transformers_model("tiny_mixtral", str(root / "mixtral" / "hf"))},
         "mixed": {"hf": save_transformers_model("tiny_qwen2_moe_mixed", str(root / "mixed" / "hf"))}}
    for name, x in d.items():
        x.update({k: str(root / name / k) for k in ("td", "mg", "fsdp", "td4", "hf2", "leg")})
    run_jobs(2, [[f"source.path={x['hf']}", f"target.path={x['td']}", "parallel.target_tp=2", "parallel.target_pp=2"]
                 for x in d.values()], root, "to_td")
    for name in MODELS:
        x = d[name]
        run_torchrun(4, [CHECK, os.path.join(x["td"], "release"), x["hf"], "2,2,1", "--resave", x["mg"]], timeout=600)
    jobs = []
    for name, x in d.items():
        src = os.path.join(x["mg"], "torch_dist") if name in MODELS else x["td"]
        # Megatron-made: the run's iteration (7) and the vocab size its args lack
        # ours, from HF: padded for TP=2 like its torch_dist, so the converter's key list has the same shapes
        model = [f"+model={MODELS[name]}", "target.iteration=7"] if name in MODELS else ["parallel.target_tp=2"]
        it = ["target.iteration=7"] if name in MODELS else []
        jobs += [[f"source.path={src}", f"target.path={x['fsdp']}", "target.format=fsdp_dtensor", *model],
                 [f"source.path={x['fsdp']}", f"target.path={x['td4']}", "parallel.target_tp=4", *it],
                 [f"source.path={x['fsdp']}", f"target.path={x['hf2']}", "target.format=hf"],
                 [f"source.path={x['fsdp']}", f"target.path={x['leg']}", "target.format=megatron_legacy",
                  "parallel.target_tp=2", "parallel.target_pp=2"]]
    run_jobs(3, jobs, root, "fsdp")
    for name in MODELS:
        x = d[name]
        p = run_torchrun(4, [CHECK, os.path.join(x["td4"], "iter_0000007"), x["hf"], "4,1,1", "--logits"], timeout=600)
        x["megatron"] = [line for line in p.stdout.splitlines() if line.startswith("OK ")]
    return d


@pytest.mark.parametrize("name", list(MODELS))
def test_megatron_made_torch_dist_through_fsdp_dtensor_loads_at_tp4_every_tensor_equal(chain, name):
    lines = chain[name]["megatron"]
    assert sum(line.startswith("OK rank") and "tensors equal" in line for line in lines) == 4, lines
    logits = [line for line in lines if line.startswith("OK logits")]
    assert len(logits) == 4 and all(float(line.rsplit("= ", 1)[1]) <= 1e-4 for line in logits), logits


@pytest.mark.parametrize("name", list(MODELS))
def test_the_iteration_is_written_as_megatron_does(chain, name):
    with open(os.path.join(chain[name]["fsdp"], "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "7"
    assert os.path.isdir(os.path.join(chain[name]["fsdp"], "iter_0000007"))


def test_dense_keys_and_shapes_equal_megatron_lm_converter(chain):
    x = chain["llama3"]
    expected = {}
    for k, s in _dcp_shapes(os.path.join(x["mg"], "torch_dist", "iter_0000007")).items():
        expected.update(fsdp_keys_from_torch_dist(k, s))
    ours = _dcp_shapes(os.path.join(x["fsdp"], "iter_0000007"))
    assert ours == expected and len(ours) == 3 + 4 * 7  # embedding, final norm, output; 7 a layer (fc1 in halves)


def test_moe_keys_equal_the_converter_but_experts_split_per_expert(chain):
    """Homogeneous MoE: Megatron-LM's converter keeps a stacked expert key ``[E, ...]`` per layer (see
    fsdp_keys_from_torch_dist); we write Megatron-FSDP's per-expert names. Every other key is equal, and
    splitting the converter's expert stacks per expert (with SwiGLU halves) gives exactly ours."""
    x = chain["mixtral"]
    conv = {}
    for k, s in _dcp_shapes(os.path.join(x["mg"], "torch_dist", "iter_0000007")).items():
        conv.update(fsdp_keys_from_torch_dist(k, s))
    ours = _dcp_shapes(os.path.join(x["fsdp"], "iter_0000007"))
    stacks = {k: s for k, s in conv.items() if ".experts.experts." in k}
    assert stacks and all(s[0] == 8 for s in stacks.values())
    rest = {k: s for k, s in conv.items() if k not in stacks}
    split = {}
    for k, s in stacks.items():  # the per-expert split the converter applies to per-layer expert keys
        split.update(_per_expert(k, s))
    ours_rest = {k: s for k, s in ours.items() if k not in split}
    aliases = set(ours_rest) - set(rest)  # the MoE pre-MLP norm, written under both of Megatron's spellings
    assert all(k.endswith("pre_mlp_layernorm.weight") or k.endswith("mlp.linear_fc1.layer_norm_weight") for k in aliases)
    assert {k: ours[k] for k in split} == split and {k: ours_rest[k] for k in rest} == rest


def _per_expert(key, shape):
    key = key.replace(".experts.experts.", ".experts.")
    a, _, b = key.partition(".weight")
    out = {}
    for e in range(shape[0]):
        k = f"{a}.weight{e}{b}"
        if ".linear_fc1." in k:
            out[k + "_w"] = out[k + "_v"] = (shape[1] // 2,) + tuple(shape[2:])
        else:
            out[k] = tuple(shape[1:])
    return out


def test_mixed_layer_keys_equal_megatron_lm_converter(chain):
    """Dense and MoE layers: torch_dist keys every layer, so the converter splits experts too - equal keys."""
    x = chain["mixed"]
    conv = {}
    for k, s in _dcp_shapes(os.path.join(x["td"], "release")).items():
        conv.update(fsdp_keys_from_torch_dist(k, s))
    ours = _dcp_shapes(os.path.join(x["fsdp"], "release"))
    assert any("weight3_w" in k for k in ours) and ours == conv


def test_plain_dcp_reads_the_fsdp_tensors_as_megatron_fsdp_names_them(chain):
    x = chain["mixtral"]
    tensors, objects = read_dcp(os.path.join(x["fsdp"], "iter_0000007"))
    hf = load_hf(x["hf"])
    p = "model.module.decoder.layers.1."
    assert torch.equal(tensors[p + "mlp.experts.linear_fc1.weight5_w"], hf["model.layers.1.block_sparse_moe.experts.5.w1.weight"])
    assert torch.equal(tensors[p + "mlp.experts.linear_fc1.weight5_v"], hf["model.layers.1.block_sparse_moe.experts.5.w3.weight"])
    assert torch.equal(tensors[p + "mlp.experts.linear_fc2.weight5"], hf["model.layers.1.block_sparse_moe.experts.5.w2.weight"])
    assert torch.equal(tensors[p + "self_attention.linear_proj.weight"], hf["model.layers.1.self_attn.o_proj.weight"])
    assert not any("_extra_state" in k for k in list(tensors) + list(objects))
    assert objects["checkpoint_version"] == 3.0 and objects["iteration"] == 7
    assert objects["args"].ckpt_format == "fsdp_dtensor" and objects["reshard"]["spec"]["num_experts"] == 8


@pytest.mark.parametrize("name", ["llama3", "mixtral", "mixed"])
def test_fsdp_dtensor_to_hf_and_legacy_equal_the_source(chain, name):
    x = chain[name]
    for other in ("hf2", "leg", "td4"):
        p = run_reshard(["compare", x["hf"], x[other]])
        assert p.stdout.strip().endswith("EQUAL"), p.stdout


def test_inspect_names_the_format_and_every_key(chain):
    p = subprocess.run([sys.executable, "-m", "reshard", "inspect", chain["mixtral"]["fsdp"]], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=REPO), check=True)
    assert ": fsdp_dtensor" in p.stdout.splitlines()[0]
    assert "model.module.decoder.layers.3.mlp.experts.linear_fc1.weight7_v" in p.stdout


def test_a_missing_expert_half_is_named_and_nothing_is_written(chain, tmp_path):
    """The .metadata of a copy without one key: refused by name, no target left behind."""
    import pickle

    src = tmp_path / "broken"
    shutil.copytree(chain["mixtral"]["fsdp"], src)
    md_path = src / "iter_0000007" / ".metadata"
    with open(md_path, "rb") as f:
        md = pickle.load(f)
    gone = "model.module.decoder.layers.2.mlp.experts.linear_fc1.weight4_v"
    del md.state_dict_metadata[gone]
    with open(md_path, "wb") as f:
        pickle.dump(md, f)
    out = tmp_path / "out"
    p = run_reshard([f"source.path={src}", f"target.path={out}", f"paths.root={tmp_path}"], check=False)
    assert p.returncode != 0 and f"{gone} is absent" in p.stderr + p.stdout
    assert not out.exists()

