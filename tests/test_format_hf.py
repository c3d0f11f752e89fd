"""The Hugging Face reader: index from headers only, slices equal to safetensors' own."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reshard.errors import SourceError
from reshard.formats import hf
from reshard.spec import to_hf_config
from reshard.synthetic import load_preset, write_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hfr") / "hf")
    write_hf(path, load_preset("tiny_qwen2"), dtype=torch.bfloat16, shards=3)
    return path


def test_the_index_lists_every_tensor_with_its_file_shape_dtype_and_offset(ckpt):
    idx = hf.read_index(ckpt)
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(idx.shapes) == set(weight_map)
    for name, (sl,) in idx.slices.items():
        assert sl.stored.file == weight_map[name]
        with safe_open(os.path.join(ckpt, sl.stored.file), "pt") as h:
            t = h.get_tensor(name)
        assert tuple(t.shape) == sl.stored.shape and t.dtype == sl.stored.dtype == torch.bfloat16
    assert idx.total_bytes == sum(s.stored.nbytes for (s,) in idx.slices.values())
    assert idx.spec.tie_word_embeddings and idx.spec.qkv_bias


def test_row_runs_and_rectangles_read_exactly_what_safetensors_reads(ckpt):
    idx, reader = hf.read_index(ckpt), hf.Reader(ckpt)
    for name, (sl,) in idx.slices.items():
        st = sl.stored
        with safe_open(os.path.join(ckpt, st.file), "pt") as h:
            ref = h.get_tensor(name)
        assert torch.equal(reader.read(st, (0,) * ref.dim(), st.shape), ref)
        if ref.dim() == 2 and ref.shape[0] > 5:
            assert torch.equal(reader.read(st, (3, 0), (2, ref.shape[1])), ref[3:5])
            assert torch.equal(reader.read(st, (1, 4), (3, 5)), ref[1:4, 4:9])
        if ref.dim() == 1 and ref.shape[0] > 5:
            assert torch.equal(reader.read(st, (2,), (3,)), ref[2:5])
    reader.close()


def test_a_single_file_checkpoint_is_read_without_an_index(tmp_path):
    path = str(tmp_path / "one")
    write_hf(path, load_preset("tiny_llama2"), shards=1)
    assert os.listdir(path).count("model.safetensors") == 1
    assert hf.detect(path) and len(hf.read_index(path).shapes) == 3 + 4 * 9


def test_a_file_missing_a_tensor_its_index_promises_is_named(tmp_path):
    path = str(tmp_path / "m")
    write_hf(path, load_preset("tiny_llama2"), shards=2)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(SourceError, match="lacks 1 tensor.*model.layers.9.mlp.up_proj.weight"):
        hf.read_index(path)


def test_a_header_cut_short_is_reported_as_truncated(tmp_path):
    path = str(tmp_path / "m")
    write_hf(path, load_preset("tiny_llama2"), shards=1)
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(20)
    with pytest.raises(SourceError, match="truncated"):
        hf.read_index(path)


def test_pickle_only_checkpoints_are_explained(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_hf_config(load_preset("tiny_llama2"))))
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(SourceError, match="torch pickles; convert them to safetensors"):
        hf.read_index(str(path))


def test_tensors_of_other_dtypes_keep_their_dtype(tmp_path):
    path = tmp_path / "d"
    path.mkdir()
    save_file({"a": torch.arange(12, dtype=torch.int32).reshape(3, 4), "b": torch.ones(2, dtype=torch.float16)},
              str(path / "x.safetensors"))
    st = hf.read_header(str(path / "x.safetensors"))
    assert st["a"].dtype == torch.int32 and st["b"].dtype == torch.float16
    r = hf.Reader(str(path))
    assert torch.equal(r.read(st["a"], (1, 0), (2, 4)), torch.arange(4, 12, dtype=torch.int32).reshape(2, 4))
