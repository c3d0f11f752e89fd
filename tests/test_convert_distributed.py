"""HF -> torch_dist with real ranks (torchrun, gloo) for every family, world sizes 1-4,
target layouts with TP=4, PP=4, PP != world size, VPP, kv heads < TP, the exchange path with
a tiny budget, and a dtype cast. Outputs are read back with plain torch.distributed.checkpoint
and compared with expectations built from the HF tensors by the pure transforms."""

import glob
import json
import os

import pytest
import torch

from conftest import REPO, run_torchrun
from expected import expected_torch_dist, load_hf, read_dcp

# world size -> [(family, tp, pp, extra overrides)]
MATRIX = {
    1: [("llama3", 1, 1, []), ("qwen2", 2, 1, [])],
    2: [("llama2", 2, 2, ["io.kernel_copy=false"]), ("mistral", 4, 1, [])],  # mistral: 1 kv head on 4 TP ranks
    3: [("llama3", 2, 2, []), ("llama3", 4, 4, ["io.assign=layout", "io.buffer_mb=0.01", "io.max_piece_mb=0.004"]),
        ("qwen2", 1, 4, [])],
    4: [("llama2", 4, 2, ["parallel.target_vpp=2"]), ("mistral", 2, 1, ["io.assign=layout"]),
        ("llama3", 1, 1, ["target.dtype=bfloat16", "target.iteration=1500"])],
}
JOBS = [(w, i, *job) for w, jobs in MATRIX.items() for i, job in enumerate(jobs)]


def _target(root, world, i, fam, tp, pp):
    return os.path.join(root, f"w{world}_{i}_{fam}_tp{tp}_pp{pp}")


@pytest.fixture(scope="module")
def conversions(hf_models, tmp_path_factory):
    """Run every world size's jobs in one torchrun each (one process group per launch, as multirun)."""
    root = str(tmp_path_factory.mktemp("converted"))
    results = {}
    for world, jobs in MATRIX.items():
        job_list = []
        for i, (fam, tp, pp, extra) in enumerate(jobs):
            job_list.append([f"source.path={hf_models[fam]}", f"target.path={_target(root, world, i, fam, tp, pp)}",
                             f"parallel.target_tp={tp}", f"parallel.target_pp={pp}", f"paths.root={root}",
                             "io.progress=none", *extra])
        jobs_file = os.path.join(root, f"jobs_{world}.json")
        out_file = os.path.join(root, f"results_{world}.json")
        with open(jobs_file, "w") as f:
            json.dump(job_list, f)
        run_torchrun(world, [os.path.join(REPO, "tests", "drivers", "convert_jobs.py"), jobs_file, out_file])
        with open(out_file) as f:
            for i, r in enumerate(json.load(f)):
                results[(world, i)] = r
    return root, results


@pytest.mark.parametrize("world,i,family,tp,pp,extra", JOBS,
                         ids=[f"{w}ranks-{f}-tp{tp}-pp{pp}{'-' + '-'.join(e) if e else ''}"
                              for w, _, f, tp, pp, e in JOBS])
def test_hf_to_torch_dist_is_exact_for_every_family_layout_and_world_size(
        conversions, hf_models, world, i, family, tp, pp, extra):
    root, results = conversions
    assert results[(world, i)] == {"ok": True}
    target = _target(root, world, i, family, tp, pp)
    cast = next((e.split("=")[1] for e in extra if e.startswith("target.dtype=")), None)
    iteration = next((int(e.split("=")[1]) for e in extra if e.startswith("target.iteration=")), None)
    ckpt = os.path.join(target, "release" if iteration is None else f"iter_{iteration:07d}")
    with open(os.path.join(target, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == ("release" if iteration is None else str(iteration))
    with open(os.path.join(ckpt, "metadata.json")) as f:
        assert json.load(f) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    # nothing left beside the committed target
    assert not glob.glob(os.path.join(root, f".{os.path.basename(target)}.reshard-staging-*"))

    tensors, objects = read_dcp(ckpt)
    common = objects.pop("common_state/shard_0_1")[0]
    spec, args = common["reshard"]["spec"], common["args"]
    padded = -(-spec["vocab_size"] // (128 * tp)) * (128 * tp)
    hf = load_hf(hf_models[family])
    expected = expected_torch_dist(hf, spec, padded)
    assert sorted(tensors) == sorted(expected)
    for k, exp in expected.items():
        exp = exp.to(getattr(torch, cast)) if cast else exp
        assert tensors[k].dtype == exp.dtype, k
        assert torch.equal(tensors[k], exp), f"{k} differs"

    L = spec["num_layers"]
    linears = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    assert sorted(objects) == sorted(f"decoder.layers.{m}._extra_state/shard_{i}_{L}" for m in linears
                                     for i in range(L))
    assert all(v == [None] for v in objects.values())
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
    assert args.padded_vocab_size == padded and args.vocab_size == spec["vocab_size"]
    assert args.num_query_groups == spec["num_query_groups"] and args.rotary_base == spec["rope_theta"]
    assert args.untie_embeddings_and_output_weights == (not spec["tie_word_embeddings"])
    assert args.add_qkv_bias == spec["qkv_bias"]
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == (iteration or 0)
    if family == "llama3":
        assert args.use_rope_scaling and args.rope_scaling_factor == 8.0

    with open(os.path.join(target, "reshard_report.json")) as f:
        report = json.load(f)
    assert report["world_size"] == world and len(report["ranks"]) == world
    source_bytes = sum(t.numel() * t.element_size() for t in hf.values())
    assert report["totals"]["bytes_read"] == source_bytes  # read once
    for r in report["ranks"]:
        assert r["bytes_read"] == r["planned"]["read"] and r["bytes_written"] == r["planned"]["write"]
        assert r["peak_rss_mb"] > 0 and "write" in r["seconds"]
    if "io.assign=layout" in extra:
        assert report["totals"]["bytes_sent"] > 0
        assert report["totals"]["bytes_sent"] == report["totals"]["bytes_received"]
    if "io.buffer_mb=0.01" in extra:
        assert report["rounds"] > 1
    if "io.assign=layout" not in extra:
        assert report["totals"]["bytes_sent"] == 0  # each rank writes what it read
    copied = report["totals"]["bytes_kernel_copied"]
    if cast or "io.kernel_copy=false" in extra:
        assert copied == 0
    elif "io.assign=layout" not in extra:
        assert copied > 0.5 * source_bytes  # unchanged bytes go file to file

