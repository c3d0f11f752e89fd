"""Megatron <-> Megatron at any layout, with Megatron-core as the referee.

Sources are made by Megatron-core itself on CPU (``tests/referees/mcore_ckpt.py make``): a
random GPTModel at TP=2 PP=2 VPP=2 (or TP=2 PP=1 for the tied/bias family), saved as legacy
files (its ``state_dict()`` per rank, ``args`` holding a Megatron enum, numpy RNG state) and
with Megatron's own ``dist_checkpointing.save``. Outputs are loaded back by a GPTModel built
at the target layout - legacy with strict ``load_state_dict`` on every rank, torch_dist with
``dist_checkpointing.load`` - and compared with Megatron's own resharding of its torch_dist
checkpoint to that layout, tensor by tensor.
"""

import json
import os

import pytest
import torch

from conftest import REPO, run_reshard, run_torchrun

MCORE = os.path.join(REPO, "tests", "referees", "mcore_ckpt.py")


def _spec(preset, vocab, path):
    from reshard.synthetic import load_preset

    spec = load_preset(preset).to_dict()
    spec["vocab_size"] = vocab  # not a multiple of 128: padding rows on every layout
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


def _make(tmp_path_factory, name, preset, tp, pp, vpp):
    root = tmp_path_factory.mktemp(name)
    spec = _spec(preset, 250, str(root / "spec.json"))
    run_torchrun(tp * pp, [MCORE, "make", spec, str(root / "src"), str(tp), str(pp), str(vpp)], timeout=600)
    return {"spec": spec, "legacy": str(root / "src" / "legacy"), "torch_dist": str(root / "src" / "torch_dist"),
            "root": root}


@pytest.fixture(scope="module")
def llama3_vpp(tmp_path_factory):
    """Llama-3 GQA made by Megatron at TP=2 PP=2 VPP=2 (8 layers would be nicer; 4 split 1 per chunk)."""
    return _make(tmp_path_factory, "mc_llama3", "tiny_llama3", 2, 2, 2)


@pytest.fixture(scope="module")
def qwen2_pp(tmp_path_factory):
    """Qwen2 (qkv bias, tied embeddings) made at TP=2 PP=1; read back at PP=2, where the last
    stage must hold the output copy."""
    return _make(tmp_path_factory, "mc_qwen2", "tiny_qwen2", 2, 1, 0)


def _check_all(src, jobs, world):
    """Megatron checks of several outputs in one torchrun (Megatron imported once per rank):
    ``jobs`` = [(kind, ckpt, tp, pp, vpp)]; returns the OK lines of each job, one per model-parallel
    rank (data-parallel replicas, which fill the ranks of smaller layouts, are folded)."""
    p = run_torchrun(world, [MCORE, "check", src["spec"], src["torch_dist"],
                             *(":".join(map(str, j)) for j in jobs)], timeout=900)
    out = []
    for k, (_, _, tp, pp, _) in enumerate(jobs):
        oks = {}
        for line in p.stdout.splitlines():
            if line.startswith(f"OK job {k} rank"):
                where = line.split(": ")[0].split(" tp ")[1]  # "t pp p"
                oks.setdefault(where, line)
        assert len(oks) == tp * pp, p.stdout
        out.append(sorted(oks.values(), key=lambda o: o.split(" tp ")[1]))
    return out


def _jobs(world, jobs, root, name):
    """Several conversions in one torchrun (the multirun driver)."""
    jf, rf = str(root / f"{name}.json"), str(root / f"{name}_results.json")
    with open(jf, "w") as f:
        json.dump([["model.vocab_size=250", f"paths.root={root}", *j] for j in jobs], f)
    run_torchrun(world, [os.path.join(REPO, "tests", "drivers", "convert_jobs.py"), jf, rf], timeout=600)
    with open(rf) as f:
        results = json.load(f)
    assert all(r["ok"] for r in results), results


@pytest.fixture(scope="module")
def llama3_outputs(llama3_vpp):
    """Every conversion of the Megatron-made Llama-3 source, then every Megatron check in one run:
    legacy VPP -> legacy TP=1 PP=4; legacy -> torch_dist TP=4, loaded at TP=2 PP=2 and at TP=1 PP=2
    VPP=2; Megatron's torch_dist -> legacy TP=4 (conversions on 3 ranks)."""
    root, src = llama3_vpp["root"], llama3_vpp
    out = {k: str(root / k) for k in ("leg_tp1_pp4", "td_tp4", "leg_tp4", "td_rt", "back")}
    _jobs(3, [[f"source.path={src['legacy']}", f"target.path={out['leg_tp1_pp4']}", "target.format=megatron_legacy",
               "parallel.target_tp=1", "parallel.target_pp=4", "target.transformer_impl=local"],
              [f"source.path={src['legacy']}", f"target.path={out['td_tp4']}", "parallel.target_tp=4"],
              [f"source.path={src['torch_dist']}", f"target.path={out['leg_tp4']}", "target.format=megatron_legacy",
               "parallel.target_tp=4", "target.transformer_impl=local"],
              # legacy -> torch_dist -> legacy at the source's layout (compared in a test below)
              [f"source.path={src['legacy']}", f"target.path={out['td_rt']}", "parallel.target_tp=1"],
              [f"source.path={out['td_rt']}", f"target.path={out['back']}", "target.format=megatron_legacy",
               "parallel.target_tp=2", "parallel.target_pp=2", "parallel.target_vpp=2",
               "target.transformer_impl=local"]], root, "llama3_jobs")
    checks = _check_all(src, [("legacy", out["leg_tp1_pp4"], 1, 4, 0), ("torch_dist", out["td_tp4"], 2, 2, 0),
                              ("torch_dist", out["td_tp4"], 1, 2, 2), ("legacy", out["leg_tp4"], 4, 1, 0)], 4)
    return out, checks


def test_legacy_vpp_to_legacy_tp1_pp4_loads_strictly_on_every_rank(llama3_outputs):
    oks = llama3_outputs[1][0]
    assert [o.split(": ")[0].split(" tp ")[1] for o in oks] == [f"0 pp {p}" for p in range(4)]
    assert sum(int(o.split(": ")[1].split()[0]) for o in oks) == 27  # 4 layers x 6 + 3


def test_legacy_to_torch_dist_loads_in_megatron_at_two_layouts(llama3_outputs):
    at_tp2_pp2, at_tp1_pp2_vpp2 = llama3_outputs[1][1:3]
    assert len(at_tp2_pp2) == 4 and len(at_tp1_pp2_vpp2) == 2
    # TP=2 PP=2: each stage holds 2 layers x 6 tensors + the embedding (first) or norm + output (last)
    assert sorted(int(o.split(": ")[1].split()[0]) for o in at_tp2_pp2) == [13, 13, 14, 14]


def test_megatron_torch_dist_to_legacy_tp4(llama3_outputs):
    oks = llama3_outputs[1][3]
    assert [o.split(": ")[0].split(" tp ")[1] for o in oks] == [f"{t} pp 0" for t in range(4)]


def _legacy_tensors(ckpt):
    from tests.referees.mcore_ckpt import iter_dir

    out = {}
    d = iter_dir(ckpt)
    for rank_dir in sorted(os.listdir(d)):
        state = torch.load(os.path.join(d, rank_dir, "model_optim_rng.pt"), weights_only=False)
        for mk in sorted(k for k in state if k.startswith("model")):
            for k, v in state[mk].items():
                out[f"{rank_dir}/{mk}/{k}"] = v
    return out


def test_legacy_to_torch_dist_to_legacy_is_identical(llama3_vpp, llama3_outputs):
    back = llama3_outputs[0]["back"]
    a, b = _legacy_tensors(llama3_vpp["legacy"]), _legacy_tensors(back)
    assert a.keys() == b.keys()
    n = 0
    for k in a:
        if a[k] is None:
            assert b[k] is None, k
            continue
        x, y = a[k], b[k]
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            # Megatron's padding rows hold random init; ours repeat the last real row. Real rows only.
            tp = int(k.split("mp_rank_")[1][:2])
            real = max(0, min(x.shape[0], 250 - tp * x.shape[0]))
            x, y = x[:real], y[:real]
        assert x.dtype == y.dtype and torch.equal(x, y), k
        n += 1
    assert n == 4 * 2 * 6 + 2 * 3  # 2 TP files per layer, embedding/norm/output on 2 TP ranks


def test_tied_qwen2_with_bias_round_trips_through_both_formats(qwen2_pp):
    root = qwen2_pp["root"]
    _jobs(3, [[f"source.path={qwen2_pp['legacy']}", f"target.path={root / 'td'}", "parallel.target_tp=1",
               "parallel.target_pp=1"],
              [f"source.path={root / 'td'}", f"target.path={root / 'leg'}", "target.format=megatron_legacy",
               "parallel.target_tp=1", "parallel.target_pp=2", "target.transformer_impl=local"]], root, "qwen2_jobs")
    # the strict legacy load needs the tied output copy on stage 1
    td, leg = _check_all(qwen2_pp, [("torch_dist", str(root / "td"), 1, 2, 0),
                                    ("legacy", str(root / "leg"), 1, 2, 0)], 2)
    assert len(td) == 2 and len(leg) == 2


# ---------------------------------------------------------------- without Megatron (fast)

def test_hf_to_legacy_every_rank_file_holds_the_expected_local_tensors(hf_models, tmp_path):
    """HF -> legacy TP=2 PP=2 on 3 ranks; each file's tensors equal the HF tensors mapped by hand."""
    from reshard.synthetic import load_preset
    from tests.expected import load_hf
    from tests.referees.check_mcore_load import expected_local

    out = str(tmp_path / "leg")
    run_reshard([f"source.path={hf_models['qwen2']}", f"target.path={out}", "target.format=megatron_legacy",
                 "parallel.target_tp=2", "parallel.target_pp=2", "target.transformer_impl=local",
                 f"paths.root={tmp_path}"], nproc=3)
    hf = load_hf(hf_models["qwen2"])
    spec = load_preset("tiny_qwen2").to_dict()
    padded = -(-spec["vocab_size"] // 256) * 256
    n = 0
    for t in range(2):
        for p in range(2):
            state = torch.load(os.path.join(out, "release", f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"),
                               weights_only=False)
            assert state["args"].padded_vocab_size == padded and state["args"].pipeline_model_parallel_size == 2
            for name, v in state["model"].items():
                if name.endswith("_extra_state"):
                    assert v is None
                    continue
                exp = expected_local(name, hf, spec, 2, t, p * 2, padded)
                assert v.shape == exp.shape and torch.equal(v, exp), (t, p, name)
                n += 1
    # per TP rank: stage 0 = embedding + 2 layers x 7, stage 1 = 2 layers x 7 + norm + tied output copy
    assert n == 2 * (1 + 14 + 14 + 2)


def test_torch_dist_to_torch_dist_repads_the_vocab_for_the_new_tp(hf_models, tmp_path):
    from reshard.synthetic import load_preset
    from tests.expected import expected_torch_dist, load_hf, read_dcp

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [f"paths.root={tmp_path}"]
    run_reshard([f"source.path={hf_models['llama3']}", f"target.path={a}", *common], nproc=1)
    run_reshard([f"source.path={a}", f"target.path={b}", "parallel.target_tp=4", "parallel.target_pp=2",
                 *common], nproc=2)
    spec = load_preset("tiny_llama3").to_dict()
    padded = -(-spec["vocab_size"] // 512) * 512
    got, objects = read_dcp(os.path.join(b, "release"))
    exp = expected_torch_dist(load_hf(hf_models["llama3"]), spec, padded)
    assert got.keys() == exp.keys()
    for k in exp:
        assert got[k].shape == exp[k].shape and torch.equal(got[k], exp[k]), k
    assert objects["common_state/shard_0_1"][0]["args"].padded_vocab_size == padded


def test_legacy_uneven_first_and_last_stage_round_trips(hf_models, tmp_path):
    """PP=3 with 1 layer on the first and last stage, 2 in the middle; back to HF unchanged."""
    from tests.expected import load_hf

    leg, back = str(tmp_path / "leg"), str(tmp_path / "back")
    run_reshard([f"source.path={hf_models['llama2']}", f"target.path={leg}", "target.format=megatron_legacy",
                 "parallel.target_pp=3", "parallel.target_first_stage_layers=1",
                 "parallel.target_last_stage_layers=1", f"paths.root={tmp_path}"], nproc=2)
    layers = []
    for p in range(3):
        state = torch.load(os.path.join(leg, "release", f"mp_rank_00_{p:03d}", "model_optim_rng.pt"),
                           weights_only=False)
        assert state["args"].decoder_first_pipeline_num_layers == 1
        layers.append(len({k.split(".")[2] for k in state["model"] if k.startswith("decoder.layers.")}))
    assert layers == [1, 2, 1]
    run_reshard([f"source.path={leg}", f"target.path={back}", "target.format=hf", f"paths.root={tmp_path}"], nproc=1)
    a, b = load_hf(hf_models["llama2"]), load_hf(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("common_pt", [False, True])
def test_torch_dist_per_layer_keys_and_common_pt_are_read(hf_models, tmp_path, common_pt):
    """Per-layer keys (``decoder.layers.{i}.…``, as models mixing layer types store them) and the
    older ``common.pt`` instead of the DCP byte entry."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from tests.expected import load_hf, read_dcp

    stacked, flat, back = (str(tmp_path / x) for x in ("stacked", "flat", "back"))
    run_reshard([f"source.path={hf_models['qwen2']}", f"target.path={stacked}", f"paths.root={tmp_path}"], nproc=1)
    tensors, objects = read_dcp(os.path.join(stacked, "release"))
    state = {}
    for k, v in tensors.items():
        if k.startswith("decoder.layers.") and k.count(".") >= 3 and v.dim() >= 2 and v.shape[0] == 4 and \
                "final" not in k:
            for i in range(v.shape[0]):
                state[k.replace("decoder.layers.", f"decoder.layers.{i}.")] = v[i].clone()
        else:
            state[k] = v
    common = objects["common_state/shard_0_1"][0]
    os.makedirs(os.path.join(flat, "release"))
    if not common_pt:
        state["common_state/shard_0_1"] = [common]
    dcp.save(state, checkpoint_id=os.path.join(flat, "release"), no_dist=True,
             planner=DefaultSavePlanner(flatten_state_dict=False))
    if common_pt:
        torch.save(common, os.path.join(flat, "release", "common.pt"))
    with open(os.path.join(flat, "release", "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    with open(os.path.join(flat, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    run_reshard([f"source.path={flat}", f"target.path={back}", "target.format=hf", f"paths.root={tmp_path}"],
                nproc=2)
    a, b = load_hf(hf_models["qwen2"]), load_hf(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
