"""Bad input gets a clear error (what, why, what to do) and loses nothing: no target, no
staging directory, nothing that looks like a checkpoint."""

import glob
import json
import os
import shutil

import pytest

from reshard import config
from reshard.errors import ConfigError, LayoutError, SourceError, TargetError, UnsupportedError, WriteError
from reshard.run import convert
from reshard.synthetic import load_preset, write_hf


@pytest.fixture
def src(tmp_path):
    path = str(tmp_path / "hf")
    write_hf(path, load_preset("tiny_llama3"), shards=3)
    return path


def _convert(src, target, *extra):
    cfg = config.compose([f"source.path={src}", f"target.path={target}", "io.progress=none",
                          f"paths.root={os.path.dirname(target)}", *extra])
    config.validate(cfg)
    return convert(cfg)


def _nothing_left(target):
    assert not os.path.exists(target)
    assert not glob.glob(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}*"))


def _shard(src, n):
    return os.path.join(src, f"model-{n:05d}-of-00003.safetensors")


def test_a_missing_source_is_named(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match="does not exist; set source.path"):
        _convert(str(tmp_path / "nope"), out)
    _nothing_left(out)


def test_a_source_that_is_a_file_or_has_no_weights_is_explained(tmp_path, src):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SourceError, match="not a directory"):
        _convert(str(f), str(tmp_path / "o1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="cannot tell the format"):
        _convert(str(empty), str(tmp_path / "o2"))
    with open(os.path.join(src, "config.json"), "w") as fh:
        fh.write("{ not json")
    with pytest.raises(SourceError, match="cannot be read as JSON"):
        _convert(src, str(tmp_path / "o3"))
    _nothing_left(str(tmp_path / "o3"))


def test_a_shard_named_by_the_index_but_absent_is_named(tmp_path, src):
    os.remove(_shard(src, 2))
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match=r"model-00002-of-00003.safetensors is named by the index but does not exist"):
        _convert(src, out)
    _nothing_left(out)


def test_a_truncated_safetensors_shard_is_caught_before_any_data_moves(tmp_path, src):
    path = _shard(src, 3)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match=r"model-00003-of-00003.safetensors is truncated.*fetch this shard again"):
        _convert(src, out)
    _nothing_left(out)


def test_a_preset_that_disagrees_with_the_checkpoint_names_every_field(tmp_path, src):
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError) as e:
        _convert(src, out, "+model=tiny_llama2")
    msg = str(e.value)
    for field in ("num_query_groups: preset 4, checkpoint 2", "ffn_hidden_size", "vocab_size", "rope_theta",
                  "rope_scaling"):
        assert field in msg, msg
    _nothing_left(out)


def test_a_matching_preset_is_accepted(tmp_path, src):
    report = _convert(src, str(tmp_path / "out"), "+model=tiny_llama3")
    assert report["spec"]["name"] == "tiny_llama3"


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.target_tp=3"], "num_attention_heads=4 is not divisible by tp=3"),
    (["parallel.target_pp=3"], "num_layers=4 is not divisible by pp=3"),
    (["parallel.target_pp=2", "parallel.target_vpp=4"], "num_layers=4 is not divisible by pp*vpp=2*4"),
    (["parallel.target_tp=8"], "num_attention_heads=4 is not divisible by tp=8"),
])
def test_layouts_that_do_not_divide_fail_up_front(tmp_path, src, overrides, needle):
    out = str(tmp_path / "out")
    with pytest.raises(LayoutError, match=needle.replace("*", r"\*")):
        _convert(src, out, *overrides)
    _nothing_left(out)


def test_an_unsupported_architecture_is_named(tmp_path, src):
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UnsupportedError, match="gpt_neox.*GPTNeoXForCausalLM"):
        _convert(src, str(tmp_path / "out"))


def test_unknown_and_missing_tensors_are_listed_not_dropped(tmp_path):
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "hf")
    write_hf(src, load_preset("tiny_llama2"), shards=1)
    path = os.path.join(src, "model.safetensors")
    sd = load_file(path)
    sd["model.layers.0.mlp.extra_adapter.weight"] = sd["model.norm.weight"].clone()
    del sd["model.layers.2.self_attn.k_proj.weight"]
    save_file(sd, path)
    out = str(tmp_path / "out")
    with pytest.raises(SourceError) as e:
        _convert(src, out)
    assert "model.layers.2.self_attn.k_proj.weight" in str(e.value)
    assert "model.layers.0.mlp.extra_adapter.weight" in str(e.value) and "silently" in str(e.value)
    _nothing_left(out)


def test_a_shape_that_disagrees_with_the_config_is_named(tmp_path):
    src = str(tmp_path / "hf")
    write_hf(src, load_preset("tiny_llama2"), shards=1)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 128
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(SourceError, match=r"gate_proj.weight: checkpoint \(176, 64\), config implies \(128, 64\)"):
        _convert(src, str(tmp_path / "out"))


def test_an_existing_target_is_refused_unless_overwrite(tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(TargetError, match="exists and is not empty; pass overwrite=true"):
        _convert(src, str(out))
    assert (out / "precious.txt").read_text() == "keep me"
    _convert(src, str(out), "overwrite=true")
    assert not (out / "precious.txt").exists() and (out / "release" / ".metadata").exists()


def test_a_target_inside_the_source_is_refused(src):
    with pytest.raises(TargetError, match="overlaps the source"):
        _convert(src, os.path.join(src, "mcore"))


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, src, monkeypatch):
    from reshard.formats import torch_dist

    real_write = torch_dist.Target.write

    def write_then_fail(self, *a, **k):
        real_write(self, *a, **k)  # the staging directory now holds a complete-looking checkpoint
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch_dist.Target, "write", write_then_fail)
    out = str(tmp_path / "out")
    with pytest.raises(WriteError, match=r"rank 0: disk full \(simulated\) \(writing the target\); nothing was committed"):
        _convert(src, out)
    _nothing_left(out)


def test_a_failure_while_writing_keeps_the_previous_target_when_overwriting(tmp_path, src, monkeypatch):
    from reshard.formats import torch_dist

    out = tmp_path / "out"
    _convert(src, str(out))
    before = sorted(os.listdir(out / "release"))
    monkeypatch.setattr(torch_dist.Target, "write", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(WriteError, match="boom"):
        _convert(src, str(out), "overwrite=true")
    assert sorted(os.listdir(out / "release")) == before
    assert not glob.glob(str(tmp_path / ".out.reshard-staging-*"))


def test_invalid_options_are_reported_together():
    cfg = config.compose(["source.path=x", "target.format=pickle", "target.dtype=int3", "io.assign=random",
                          "device=tpu"])
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    msg = str(e.value)
    for needle in ("target.format='pickle'", "target.dtype='int3'", "io.assign='random'", "device='tpu'"):
        assert needle in msg


def test_an_unknown_target_format_lists_the_supported_ones():
    cfg = config.compose(["source.path=x", "target.format=gguf"])
    with pytest.raises(ConfigError, match="'torch_dist', 'megatron_legacy', 'hf', 'meta'"):
        config.validate(cfg)


def test_a_megatron_layout_with_an_hf_or_meta_target_is_refused():
    cfg = config.compose(["source.path=x", "target.format=hf", "parallel.target_tp=2"])
    with pytest.raises(ConfigError, match="describe Megatron layouts"):
        config.validate(cfg)


def test_without_preset_or_source_path_the_user_is_told_what_to_set():
    cfg = config.compose([])
    with pytest.raises(ConfigError, match="source.path is not set"):
        config.validate(cfg)


def test_a_committed_target_holds_the_checkpoint_the_tracker_and_the_report(tmp_path, src):
    out = tmp_path / "out"
    _convert(src, str(out))
    shutil.copytree(out, tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["latest_checkpointed_iteration.txt", "release",
                                                     "reshard_report.json"]


@pytest.mark.parametrize("phase,failing", [("write", 1), ("exchange", 2), ("commit", 0)])
def test_a_failure_on_one_rank_stops_every_rank_and_commits_nothing(tmp_path, src, phase, failing):
    from conftest import REPO, run_torchrun

    out, verdicts = str(tmp_path / "out"), tmp_path / "verdicts"
    verdicts.mkdir()
    run_torchrun(3, [os.path.join(REPO, "tests", "drivers", "fail_on_rank.py"), src, out, str(failing), phase,
                     str(verdicts)], timeout=240)
    lines = [(verdicts / f"rank{r}.txt").read_text() for r in range(3)]
    assert all(ln.startswith("FAILED") for ln in lines), lines
    assert f"injected failure on rank {failing}" in lines[failing]
    assert all("PeerError" in ln or "WriteError" in ln for r, ln in enumerate(lines) if r != failing), lines
    _nothing_left(out)


# ---------------------------------------------------------------- Megatron legacy sources

@pytest.fixture(scope="module")
def legacy_src(tmp_path_factory):
    """A tiny legacy checkpoint at TP=2 PP=2 VPP=2 (written by reshard from a synthetic model)."""
    root = tmp_path_factory.mktemp("legacy")
    write_hf(str(root / "hf"), load_preset("tiny_llama3"), shards=2)
    for name, it in (("legacy", 100), ("other", 200)):
        _convert(str(root / "hf"), str(root / name), "target.format=megatron_legacy", "parallel.target_tp=2",
                 "parallel.target_pp=2", "parallel.target_vpp=2", f"target.iteration={it}")
    return root


def _rank_file(ckpt, d="mp_rank_01_001", it=100):
    return os.path.join(ckpt, f"iter_{it:07d}", d, "model_optim_rng.pt")


def _broken_copy(legacy_src, tmp_path):
    dst = str(tmp_path / "src")
    shutil.copytree(str(legacy_src / "legacy"), dst)
    return dst


def _edit(path, fn):
    import torch

    state = torch.load(path, weights_only=False)
    fn(state)
    torch.save(state, path)


def _legacy_error(src, tmp_path, *words):
    target = str(tmp_path / "out")
    with pytest.raises(SourceError) as e:
        _convert(src, target, "parallel.target_tp=1")
    for w in words:
        assert w in str(e.value), str(e.value)
    _nothing_left(target)
    return str(e.value)


def test_legacy_good_copy_converts(legacy_src, tmp_path):
    _convert(_broken_copy(legacy_src, tmp_path), str(tmp_path / "out"), "parallel.target_tp=1")


def test_legacy_incomplete_mp_rank_grid_is_named(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    shutil.rmtree(os.path.dirname(_rank_file(src)))
    _legacy_error(src, tmp_path, "missing: mp_rank_01_001", "tp=2, pp=2")


def test_legacy_rank_file_from_another_checkpoint_is_named(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    shutil.copy(_rank_file(str(legacy_src / "other"), it=200), _rank_file(src))
    _legacy_error(src, tmp_path, _rank_file(src), "iteration=200")


def test_legacy_args_that_disagree_between_ranks_are_named(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    _edit(_rank_file(src, "mp_rank_00_001"), lambda s: setattr(s["args"], "rotary_base", 10000))
    _legacy_error(src, tmp_path, _rank_file(src, "mp_rank_00_001"), "rotary_base=10000")


def test_legacy_truncated_rank_file_is_named(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    path = _rank_file(src, "mp_rank_00_000")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)
    _legacy_error(src, tmp_path, path)


def test_legacy_vpp_file_missing_a_model_chunk_is_named(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    _edit(_rank_file(src, "mp_rank_01_000"), lambda s: s.pop("model1"))
    _legacy_error(src, tmp_path, _rank_file(src, "mp_rank_01_000"), "'model1'")


def test_legacy_unknown_tensor_is_not_dropped(legacy_src, tmp_path):
    src = _broken_copy(legacy_src, tmp_path)
    _edit(_rank_file(src), lambda s: s["model0"].__setitem__("decoder.layers.0.mystery.weight", s["model0"][
        "decoder.final_layernorm.weight"] if "decoder.final_layernorm.weight" in s["model0"] else
        next(v for v in s["model0"].values() if v is not None)))
    _legacy_error(src, tmp_path, "unknown tensor decoder.layers.0.mystery.weight")


def test_legacy_without_true_vocab_size_refuses_to_guess(tmp_path):
    """A checkpoint whose args record only the padded vocab (as Megatron's do) needs model.vocab_size."""
    from reshard.formats.megatron import spec_from_args
    from argparse import Namespace

    args = Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     padded_vocab_size=256, swiglu=True, normalization="RMSNorm")
    with pytest.raises(SourceError, match="true vocab size cannot be known"):
        spec_from_args(args, "x")
    assert spec_from_args(args, "x", vocab_size=250).vocab_size == 250


@pytest.fixture(scope="module")
def dist_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("td")
    write_hf(str(root / "hf"), load_preset("tiny_llama3"), shards=2)
    _convert(str(root / "hf"), str(root / "td"), "parallel.target_tp=2")
    return root


def test_torch_dist_truncated_chunk_file_is_named(dist_src, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(str(dist_src / "td"), src)
    path = sorted(glob.glob(os.path.join(src, "release", "*.distcp")))[-1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    target = str(tmp_path / "out")
    with pytest.raises(SourceError, match="truncated") as e:
        _convert(src, target)
    assert path in str(e.value)
    _nothing_left(target)


def test_torch_dist_missing_chunk_file_is_named(dist_src, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(str(dist_src / "td"), src)
    path = sorted(glob.glob(os.path.join(src, "release", "*.distcp")))[0]
    os.remove(path)
    target = str(tmp_path / "out")
    with pytest.raises(SourceError, match="does not exist") as e:
        _convert(src, target)
    assert os.path.basename(path) in str(e.value)
    _nothing_left(target)
