"""The torch_dist writer's byte paths: file-to-file kernel copies, their fallbacks, and
pieces that are views into larger buffers - each must give the same checkpoint."""

import os

import pytest
import torch

from reshard import config
from reshard.formats import files, torch_dist
from reshard.run import convert
from reshard.synthetic import load_preset, write_hf

from expected import expected_torch_dist, load_hf, read_dcp


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("td") / "hf")
    write_hf(path, load_preset("tiny_qwen2"), dtype=torch.bfloat16, shards=2)
    return path


def _convert_and_check(src, out, *extra):
    cfg = config.compose([f"source.path={src}", f"target.path={out}", "parallel.target_tp=2", "io.progress=none",
                          f"paths.root={os.path.dirname(out)}", *extra])
    report = convert(cfg)
    tensors, objects = read_dcp(os.path.join(out, "release"))
    spec = objects["common_state/shard_0_1"][0]["reshard"]["spec"]
    expected = expected_torch_dist(load_hf(src), spec, 512)
    assert sorted(tensors) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(tensors[k], v), k
    return report


def _convert_and_check_cast(src, out):
    cfg = config.compose([f"source.path={src}", f"target.path={out}", "target.dtype=float32", "io.progress=none",
                          f"paths.root={os.path.dirname(out)}"])
    report = convert(cfg)
    tensors, _ = read_dcp(os.path.join(out, "release"))
    hf = load_hf(src)
    assert torch.equal(tensors["decoder.final_layernorm.weight"], hf["model.norm.weight"].float())
    return report


def test_unchanged_bytes_are_copied_by_the_kernel_and_both_paths_give_the_same_tensors(src, tmp_path):
    fast = _convert_and_check(src, str(tmp_path / "a"))["totals"]
    slow = _convert_and_check(src, str(tmp_path / "b"), "io.kernel_copy=false")["totals"]
    # everything but the padded vocab rows (repeated, so built in memory) goes file to file
    assert 0.9 * fast["bytes_read"] < fast["bytes_kernel_copied"] < fast["bytes_read"]
    assert slow["bytes_kernel_copied"] == 0 and slow["bytes_written"] == fast["bytes_written"]


def test_a_cast_cannot_be_copied_and_is_converted_in_memory(src, tmp_path):
    r = _convert_and_check_cast(src, str(tmp_path / "cast"))
    assert r["totals"]["bytes_kernel_copied"] == 0


def test_when_the_kernel_refuses_to_copy_bytes_are_read_and_written(src, tmp_path, monkeypatch):
    import errno

    def refuse(*a):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setitem(files.KERNEL_COPY, "ok", True)
    r = _convert_and_check(src, str(tmp_path / "xdev"))
    assert files.KERNEL_COPY["ok"] is False and r["totals"]["bytes_kernel_copied"] == 0


def test_if_torch_save_never_hands_over_the_payload_the_record_is_rewritten_with_real_bytes(src, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(files, "address", lambda buf: -1)  # no write ever matches the placeholder
    r = _convert_and_check(src, str(tmp_path / "redo"))
    assert r["totals"]["bytes_kernel_copied"] == 0


def test_a_view_into_a_larger_buffer_is_saved_as_its_own_bytes_only():
    big = torch.arange(100, dtype=torch.float32)
    view = big[10:30].reshape(4, 5)
    exact = files.exact_storage(view)
    assert exact.untyped_storage().nbytes() == 80 and exact.data_ptr() == view.data_ptr()
    assert torch.equal(exact, view)
    strided = big.reshape(10, 10)[:, :3]
    assert torch.equal(files.exact_storage(strided), strided)
