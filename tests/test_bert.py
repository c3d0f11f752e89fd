"""Megatron BERT between Megatron layouts and formats, with Megatron-core's BertModel as the referee.

Sources are made by Megatron-core itself on CPU (``tests/referees/mcore_bert.py make``): a random
BertModel (local spec, norms and biases moved off 1/0) saved as legacy files and with Megatron's own
``dist_checkpointing.save``, with the MLM/NSP logits it computes at its own layout. Outputs are
loaded back by a BertModel built at the target layout (legacy: strict ``load_state_dict``; torch_dist:
``dist_checkpointing.load``), compared tensor by tensor with Megatron's own resharding of its
torch_dist save, and run: the logits must be those of the source at its layout.
"""

import json
import math
import os

import pytest
import torch

from conftest import REPO, run_jobs, run_reshard, run_torchrun

BERT = os.path.join(REPO, "tests", "referees", "mcore_bert.py")
VOCAB = 250  # not a multiple of 128: padding rows at every TP


def _make(tmp_path_factory, name, tp, pp, **changes):
    from reshard.synthetic import load_preset

    root = tmp_path_factory.mktemp(name)
    spec = dict(load_preset("tiny_bert").to_dict(), vocab_size=VOCAB, **changes)
    path = str(root / "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    run_torchrun(tp * pp, [BERT, "make", path, str(root / "src"), str(tp), str(pp)], timeout=600)
    return {"spec": path, "root": root, "src": str(root / "src"), "legacy": str(root / "src" / "legacy"),
            "torch_dist": str(root / "src" / "torch_dist")}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """tiny_bert (token types, binary head, tied output) made by Megatron at TP=2 PP=2."""
    return _make(tmp_path_factory, "mc_bert", 2, 2)


@pytest.fixture(scope="module")
def bert_plain(tmp_path_factory):
    """Without the binary head and token types, untied output layer; made at TP=2 PP=1."""
    return _make(tmp_path_factory, "mc_bert_plain", 2, 1, binary_head=False, num_tokentypes=0,
                 tie_word_embeddings=False)


def _check(src, jobs, world=4):
    """Megatron's checks of several outputs in one torchrun: ``jobs`` = [(kind, ckpt, tp, pp)]. Returns, per
    job, its OK lines (one per model-parallel rank; data-parallel replicas folded) and its LOGITS lines."""
    p = run_torchrun(world, [BERT, "check", src["spec"], src["src"], *(":".join(map(str, j)) for j in jobs)],
                     timeout=900)
    out = []
    for k, (_, _, tp, pp) in enumerate(jobs):
        oks, logits = {}, {}
        for line in p.stdout.splitlines():
            where = line.split(": ")[0].split(" tp ")[-1]
            if line.startswith(f"OK job {k} rank"):
                oks.setdefault(where, line)
            if line.startswith(f"LOGITS job {k} rank"):
                logits.setdefault(where, line)
        assert len(oks) == tp * pp, p.stdout
        assert len(logits) == tp, p.stdout  # every TP rank of the last stage
        out.append((sorted(oks.values(), key=lambda o: o.split(" tp ")[1]), sorted(logits.values())))
    return out


def _max_diffs(line):
    """The two ``max |d| = x`` figures of a LOGITS line."""
    return [float(part.split(",")[0].split(" (")[0]) for part in line.split("max |d| = ")[1:]]


@pytest.fixture(scope="module")
def outputs(bert, bert_plain):
    """Every conversion on 3 ranks (a world size neither layout has), then every Megatron check."""
    root = bert["root"]
    out = {k: str(root / k) for k in ("leg_tp1", "leg_tp4", "td_tp4", "leg_tp1_pp4", "td_tp1", "fsdp", "fsdp_td_tp4",
                                      "td_leg_tp4", "plain_td_pp2", "plain_leg_tp4")}
    v, local = f"model.vocab_size={VOCAB}", "target.transformer_impl=local"
    run_jobs(3, [
        [v, f"source.path={bert['legacy']}", f"target.path={out['leg_tp1']}", "target.format=megatron_legacy",
         "parallel.target_tp=1", local],
        [v, f"source.path={bert['legacy']}", f"target.path={out['leg_tp4']}", "target.format=megatron_legacy",
         "parallel.target_tp=4", local],
        [v, f"source.path={bert['legacy']}", f"target.path={out['td_tp4']}", "parallel.target_tp=4"],
        [v, f"source.path={bert['torch_dist']}", f"target.path={out['leg_tp1_pp4']}", "target.format=megatron_legacy",
         "parallel.target_tp=1", "parallel.target_pp=4", local],
        [v, f"source.path={bert['torch_dist']}", f"target.path={out['td_tp1']}", "parallel.target_tp=1"],
        [v, f"source.path={bert['torch_dist']}", f"target.path={out['fsdp']}", "target.format=fsdp_dtensor"],
        [f"source.path={out['fsdp']}", f"target.path={out['fsdp_td_tp4']}", "parallel.target_tp=4"],
        [v, f"source.path={bert['torch_dist']}", f"target.path={out['td_leg_tp4']}", "target.format=megatron_legacy",
         "parallel.target_tp=4", local],
        [v, f"source.path={bert_plain['legacy']}", f"target.path={out['plain_td_pp2']}", "parallel.target_tp=1",
         "parallel.target_pp=2"],
        [v, f"source.path={bert_plain['torch_dist']}", f"target.path={out['plain_leg_tp4']}",
         "target.format=megatron_legacy", "parallel.target_tp=4", local],
    ], root, "bert_jobs")
    checks = _check(bert, [("legacy", out["leg_tp1"], 1, 1), ("legacy", out["leg_tp4"], 4, 1),
                           ("torch_dist", out["td_tp4"], 4, 1), ("torch_dist", out["td_tp4"], 2, 2),
                           ("legacy", out["leg_tp1_pp4"], 1, 4), ("torch_dist", out["td_tp1"], 1, 1),
                           ("torch_dist", out["fsdp_td_tp4"], 4, 1), ("legacy", out["td_leg_tp4"], 4, 1)])
    plain = _check(bert_plain, [("torch_dist", out["plain_td_pp2"], 1, 2), ("legacy", out["plain_leg_tp4"], 4, 1),
                                ("torch_dist", out["plain_td_pp2"], 2, 1)])
    return out, checks, plain


def _counts(oks):
    return [int(o.split(": ")[1].split()[0]) for o in oks]


def test_legacy_tp2_pp2_to_tp1_and_tp4_loads_strictly_with_the_same_logits(outputs):
    (tp1, tp1_logits), (tp4, tp4_logits) = outputs[1][:2]
    # 4 layers x 12 tensors + word/position/token-type embeddings, final norm (2), pooler (2), lm_head (4),
    # output bias, binary head (2); the tied output weight is the embedding
    assert _counts(tp1) == [62] and _counts(tp4) == [62] * 4
    for line in tp1_logits + tp4_logits:
        mlm, nsp = _max_diffs(line)
        assert mlm < 1e-5 and nsp < 1e-5, line
        assert "mlm (2, 12, 250)" in line and "nsp (2, 2)" in line


def test_torch_dist_outputs_load_in_megatron_at_three_layouts(outputs):
    (tp4, _), (tp2_pp2, same_layout_logits), (td_tp1, _) = outputs[1][2], outputs[1][3], outputs[1][5]
    assert _counts(tp4) == [62] * 4 and _counts(td_tp1) == [62]
    # the source's own layout: stage 0 holds 2 layers + 3 embeddings, stage 1 2 layers + 12 head tensors
    assert sorted(_counts(tp2_pp2)) == [27, 27, 36, 36]
    for line in same_layout_logits:  # same layout, same arithmetic: the very same logits
        assert _max_diffs(line) == [0.0, 0.0], line


def test_megatron_torch_dist_to_legacy_tp4_and_tp1(outputs):
    """Megatron's own torch_dist save as the source: to legacy TP=4 (and, above, torch_dist TP=1)."""
    oks, logits = outputs[1][7]
    assert _counts(oks) == [62] * 4 and len(logits) == 4
    assert all(max(_max_diffs(x)) < 1e-5 for x in logits)


def test_tp1_pp4_puts_the_tied_output_copy_on_the_last_stage(outputs):
    oks, logits = outputs[1][4]
    assert [o.split(" tp ")[1].split(":")[0] for o in oks] == [f"0 pp {p}" for p in range(4)]
    # first stage: 1 layer + 3 embeddings; last: 1 layer + 11 head tensors + output_layer.weight (the copy)
    assert _counts(oks) == [15, 12, 12, 24]
    assert len(logits) == 1 and max(_max_diffs(logits[0])) < 1e-5


def test_fsdp_dtensor_round_trip_loads_in_megatron(outputs, bert):
    oks, logits = outputs[1][6]
    assert _counts(oks) == [62] * 4 and all(max(_max_diffs(x)) < 1e-5 for x in logits)
    from reshard.formats import fsdp_dtensor, torch_dist

    tensors, objects = torch_dist.load_full(os.path.join(outputs[0]["fsdp"], "release"))
    assert objects["checkpoint_version"] == 3.0 and objects["args"].bert_binary_head is True
    keys = sorted(k[len(fsdp_dtensor.PREFIX):] for k in tensors)
    assert "encoder.layers.3.self_attention.linear_qkv.weight" in keys  # per layer, no stacked axis
    assert not any("_extra_state" in k for k in keys) and not any(k.startswith("decoder.") for k in keys)
    assert tensors[fsdp_dtensor.PREFIX + "encoder.layers.3.mlp.linear_fc1.weight"].shape == (128, 64)  # no _w/_v


def test_without_binary_head_untied_pp2_and_tp4(outputs):
    (pp2, pp2_logits), (tp4, tp4_logits), (pp2_at_tp2, _) = outputs[2]
    # no token types, pooler or binary head: 4 layers x 12 + word, position, final norm (2), lm_head (4),
    # output weight and bias
    assert sum(_counts(pp2)) == 48 + 10 and _counts(tp4) == [58] * 4 and _counts(pp2_at_tp2) == [58, 58]
    for line in pp2_logits + tp4_logits:
        assert "no binary head" in line and len(_max_diffs(line)) == 1 and _max_diffs(line)[0] < 1e-5, line


def test_compare_and_inspect_on_bert_checkpoints(outputs, bert):
    out = outputs[0]
    for other in (out["td_tp4"], out["leg_tp1_pp4"], out["fsdp"]):
        p = run_reshard(["compare", bert["legacy"], other, "--vocab-size", str(VOCAB)])
        assert "62 of 62 canonical tensors equal" in p.stdout and p.stdout.strip().endswith("EQUAL"), p.stdout
    p = run_reshard(["inspect", out["fsdp"]])
    assert "architecture: bert, 4 layers" in p.stdout and "token types 2, binary head True" in p.stdout
    assert "learned positions 64" in p.stdout
    p = run_reshard(["inspect", bert["torch_dist"], "--vocab-size", str(VOCAB)])
    assert "layout: tp=2, pp=2" in p.stdout and "encoder.layers.self_attention.linear_qkv.weight" in p.stdout


def test_hf_and_meta_targets_refuse_a_bert_and_write_nothing(bert, tmp_path):
    for fmt in ("hf", "meta"):
        dst = tmp_path / fmt
        p = run_reshard([f"model.vocab_size={VOCAB}", f"source.path={bert['legacy']}", f"target.path={dst}",
                         f"target.format={fmt}"], check=False)
        assert p.returncode != 0 and not dst.exists()
        assert ("pre-LayerNorm" in p.stderr + p.stdout) if fmt == "hf" else ("encoder" in p.stderr + p.stdout)


def test_a_bert_missing_its_binary_head_on_one_rank_is_refused(bert, tmp_path):
    """A last-stage file without the binary head while another file of the last stage has it: the
    architecture says binary head, so the other file is incomplete."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bert["legacy"], src)
    f = src / "iter_0000100" / "mp_rank_01_001" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    del state["model"]["binary_head.weight"]
    torch.save(state, f)
    p = run_reshard([f"model.vocab_size={VOCAB}", f"source.path={src}", f"target.path={tmp_path / 'out'}"],
                    check=False)
    assert p.returncode != 0 and not (tmp_path / "out").exists()
    msg = p.stdout + p.stderr
    assert "mp_rank_01_001" in msg and "binary_head.weight is absent" in msg


def test_detected_bert_spec_and_preset_agree(bert):
    from reshard.formats import megatron_legacy, torch_dist
    from reshard.synthetic import load_preset

    preset = load_preset("tiny_bert")
    for mod, path in ((megatron_legacy, bert["legacy"]), (torch_dist, bert["torch_dist"])):
        spec = mod.read_index(path, vocab_size=VOCAB).spec
        assert spec.model_type == "bert" and spec.binary_head and spec.num_tokentypes == 2
        assert spec.max_position_embeddings == 64 and spec.tie_word_embeddings
        assert dict(spec.to_dict(), name=None) == dict(preset.to_dict(), name=None)


def test_a_preset_that_disagrees_on_the_position_table_is_refused(bert, tmp_path):
    p = run_reshard(["+model=tiny_bert", "model.max_position_embeddings=128", f"source.path={bert['legacy']}",
                     f"target.path={tmp_path / 'out'}"], check=False)
    assert p.returncode != 0 and "max_position_embeddings: preset 128, checkpoint 64" in p.stderr + p.stdout


def test_bert_340m_preset_has_transformers_parameter_count():
    """Megatron BERT and HF BERT differ in where the norms sit, not in what they hold: the same count
    (HF's embedding LayerNorm <-> Megatron's final LayerNorm; HF's decoder bias <-> output_layer.bias)."""
    import transformers

    from reshard.synthetic import canonical_shapes, load_preset

    spec = load_preset("bert_340m")
    cfg = transformers.BertConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                                  intermediate_size=spec.ffn_hidden_size, type_vocab_size=spec.num_tokentypes,
                                  max_position_embeddings=spec.max_position_embeddings)
    with torch.device("meta"):
        hf = transformers.BertForPreTraining(cfg)
    ours = sum(math.prod(s) for s in canonical_shapes(spec).values())
    assert ours == sum(p.numel() for p in hf.parameters()) == 336_226_108


def test_hf_bert_config_is_refused_with_the_reason():
    from reshard.errors import UnsupportedError
    from reshard.spec import spec_from_hf_config

    with pytest.raises(UnsupportedError, match="post-LayerNorm"):
        spec_from_hf_config({"model_type": "bert", "num_attention_heads": 4, "hidden_size": 64})


def test_live_plan_names_bert_tensors_and_refuses_vllm_naming():
    from reshard import api
    from reshard.errors import LayoutError
    from reshard.models import table_for

    p = api.plan("tiny_bert", api.Layout(tp=2, pp=2, naming="megatron", impl="local"),
                 api.Layout(tp=4, naming="megatron"))
    names = {s.name for s in api.rank_slots(p.spec, p.dst, table_for(p.spec), 1)}
    assert "encoder.layers.3.self_attention.linear_qkv.layer_norm_bias" in names
    assert "output_layer.bias" in names and not any(n.startswith("decoder.") for n in names)
    with pytest.raises(LayoutError, match="no Hugging Face / vLLM spelling"):
        api.plan("tiny_bert", api.Layout(tp=2, naming="megatron"), api.Layout(tp=2, naming="hf_tp"))
