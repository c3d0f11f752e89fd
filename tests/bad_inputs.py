"""Bad inputs and the one line each gets: the README's troubleshooting table and its test.

Each case builds a broken input in a fresh directory and says which error class and which words
the user must see. ``tests/test_bad_inputs.py`` runs every case (the line, nothing committed,
nothing left beside the target); ``python tests/bad_inputs.py`` prints the table for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from reshard.synthetic import load_preset, write_hf  # noqa: E402

CASES = []  # (id, description, error class, needle, build(root) -> overrides)


def case(desc: str, cls: str, needle: str):
    def register(fn):
        CASES.append((fn.__name__, desc, cls, needle, fn))
        return fn
    return register


def _src(root, name="hf", shards=3) -> str:
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        write_hf(path, load_preset("tiny_llama3"), shards=shards)
    return path


def _shard(src, n=1, of=3):
    return os.path.join(src, f"model-{n:05d}-of-{of:05d}.safetensors")


def _base(src, root, *extra):
    return [f"source.path={src}", f"target.path={os.path.join(root, 'out')}", *extra]


def _edit_header(path, fn, tail=b""):
    """Rewrite a safetensors header in place (the data bytes stay where they are)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data + tail)


def _tensors(header):
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


def _edit_config(src, **kv):
    p = os.path.join(src, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(kv)
    with open(p, "w") as f:
        json.dump(cfg, f)


# ---------------------------------------------------------------- source

@case("source.path does not exist", "SourceError", "does not exist; set source.path")
def missing_source(root):
    return _base(os.path.join(root, "nope"), root)


@case("source.path is a file", "SourceError", "is not a directory")
def source_is_a_file(root):
    p = os.path.join(root, "file")
    open(p, "w").write("x")
    return _base(p, root)


@case("source directory holds no checkpoint", "SourceError", "cannot tell the format")
def empty_source(root):
    p = os.path.join(root, "empty")
    os.makedirs(p)
    return _base(p, root)


@case("config.json is not JSON", "SourceError", "cannot be read as JSON")
def bad_config_json(root):
    src = _src(root)
    open(os.path.join(src, "config.json"), "w").write("{ not json")
    return _base(src, root)


@case("config.json has a word for a number", "SourceError", "num_hidden_layers='four': expected a number")
def config_word_for_number(root):
    src = _src(root)
    _edit_config(src, num_hidden_layers="four")
    return _base(src, root)


@case("unsupported architecture", "UnsupportedError", "model_type='gpt_neox'")
def unsupported_arch(root):
    src = _src(root)
    _edit_config(src, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    return _base(src, root)


@case("only pytorch_model.bin pickles", "SourceError", "torch pickles; convert them to safetensors")
def only_bin(root):
    src = _src(root)
    for f in os.listdir(src):
        if f.startswith("model"):
            os.remove(os.path.join(src, f))
    open(os.path.join(src, "pytorch_model.bin"), "w").write("x")
    return _base(src, root, "source.format=hf")


@case("a shard named by the index is absent", "SourceError", "is named by the index but does not exist")
def missing_shard(root):
    src = _src(root)
    os.remove(_shard(src, 2))
    return _base(src, root)


@case("a shard is truncated", "SourceError", "is truncated")
def truncated_shard(root):
    src = _src(root)
    with open(_shard(src, 3), "r+b") as f:
        f.truncate(os.path.getsize(_shard(src, 3)) - 100)
    return _base(src, root)


@case("a safetensors span is shorter than shape x dtype", "SourceError", "bytes but its data_offsets")
def short_span(root):
    src = _src(root)

    def shrink(h):
        (k, v), (k2, v2) = _tensors(h)[:2]
        v["data_offsets"][1] -= 4  # the neighbour's first bytes would be read as this tensor's last
    _edit_header(_shard(src, 1), shrink)
    return _base(src, root)


@case("two safetensors tensors overlap", "SourceError", "overlaps tensor")
def overlapping(root):
    src = _src(root)

    def overlap(h):
        (k, v), (k2, v2) = _tensors(h)[:2]
        v2["data_offsets"] = list(v["data_offsets"])
        v2["shape"] = list(v["shape"])
    _edit_header(_shard(src, 1), overlap)
    return _base(src, root)


@case("bytes after a shard's last tensor", "SourceError", "bytes after its last tensor")
def trailing_bytes(root):
    src = _src(root)
    _edit_header(_shard(src, 1), lambda h: None, tail=b"\0" * 64)
    return _base(src, root)


@case("a stray copy of a tensor in another shard", "SourceError", "two copies, and reshard will not guess")
def duplicate_tensor(root):
    from safetensors.torch import load_file, save_file

    src = _src(root)
    one, two = load_file(_shard(src, 1)), load_file(_shard(src, 2))
    name = sorted(one)[0]
    two[name] = one[name] + 1
    save_file(two, _shard(src, 2), metadata={"format": "pt"})
    return _base(src, root)


@case("a stored tensor the index does not name", "SourceError", "stored tensor(s) the index does not name")
def unindexed_tensor(root):
    from safetensors.torch import load_file, save_file

    src = _src(root)
    sd = load_file(_shard(src, 2))
    sd["model.layers.0.mlp.adapter.weight"] = sd[sorted(sd)[0]].clone()
    save_file(sd, _shard(src, 2), metadata={"format": "pt"})
    return _base(src, root)


@case("an int8 tensor in a float model", "SourceError", "are not floating point")
def int8_tensor(root):
    from safetensors.torch import load_file, save_file

    src = _src(root)
    sd = load_file(_shard(src, 1))
    name = sorted(sd)[0]
    sd[name] = sd[name].to("cpu").clamp(-1, 1).mul(100).to(__import__("torch").int8)
    save_file(sd, _shard(src, 1), metadata={"format": "pt"})
    return _base(src, root)


@case("a tensor the architecture does not have", "SourceError", "refusing to drop them silently")
def unknown_tensor(root):
    from safetensors.torch import load_file, save_file

    src = _src(root, shards=1)
    p = os.path.join(src, "model.safetensors")
    sd = load_file(p)
    sd["model.layers.0.mlp.adapter.weight"] = sd["model.norm.weight"].clone()
    save_file(sd, p)
    return _base(src, root)


@case("a tensor the architecture needs is absent", "SourceError", "the architecture needs are absent")
def absent_tensor(root):
    from safetensors.torch import load_file, save_file

    src = _src(root, shards=1)
    p = os.path.join(src, "model.safetensors")
    sd = load_file(p)
    del sd["model.layers.2.self_attn.k_proj.weight"]
    save_file(sd, p)
    return _base(src, root)


@case("config.json disagrees with the tensors", "SourceError", "shape(s) disagree with the config")
def config_disagrees(root):
    src = _src(root)
    _edit_config(src, intermediate_size=64)
    return _base(src, root)


@case("a preset that disagrees with the checkpoint", "ConfigError", "disagrees with the checkpoint")
def preset_disagrees(root):
    return _base(_src(root), root, "+model=tiny_llama2")


@case("source.iteration on a Hugging Face source", "ConfigError", "has no iterations")
def iteration_on_hf(root):
    return _base(_src(root), root, "source.iteration=100")


# ---------------------------------------------------------------- options and layouts

@case("target.iteration=-5", "ConfigError", "target.iteration=-5 must be >= 0")
def negative_iteration(root):
    return _base(_src(root), root, "target.iteration=-5")


@case("parallel.target_first_stage_layers=-1", "ConfigError", "target_first_stage_layers=-1 must be >= 1")
def negative_stage(root):
    return _base(_src(root), root, "parallel.target_pp=2", "parallel.target_first_stage_layers=-1")


@case("parallel.target_tp=0", "ConfigError", "parallel.target_tp=0 must be >= 1")
def zero_tp(root):
    return _base(_src(root), root, "parallel.target_tp=0")


@case("a TP that does not divide the heads", "LayoutError", "num_attention_heads=4 is not divisible by tp=3")
def tp_does_not_divide(root):
    return _base(_src(root), root, "parallel.target_tp=3")


@case("a PP that does not divide the layers", "LayoutError", "num_layers=4 is not divisible by pp=3")
def pp_does_not_divide(root):
    return _base(_src(root), root, "parallel.target_pp=3")


@case("an unknown target format", "ConfigError", "target.format='gguf'")
def unknown_format(root):
    return _base(_src(root), root, "target.format=gguf")


@case("an unknown dtype", "ConfigError", "target.dtype='int3'")
def unknown_dtype(root):
    return _base(_src(root), root, "target.dtype=int3")


@case("target.max_shard_size=lots", "ConfigError", "target.max_shard_size='lots'")
def bad_shard_size(root):
    return _base(_src(root), root, "target.format=hf", "target.max_shard_size=lots")


@case("target.hf_side_files that does not exist", "ConfigError", "target.hf_side_files=")
def missing_side_files(root):
    return _base(_src(root), root, "target.format=hf", f"target.hf_side_files={os.path.join(root, 'tok')}")


@case("target.hf_reference that does not exist", "ConfigError", "target.hf_reference=")
def missing_reference(root):
    return _base(_src(root), root, "target.format=hf", f"target.hf_reference={os.path.join(root, 'ref')}")


@case("a Megatron layout with an HF target", "ConfigError", "describe Megatron layouts")
def layout_with_hf(root):
    return _base(_src(root), root, "target.format=hf", "parallel.target_tp=2")


@case("io.commit=fast", "ConfigError", "io.commit='fast'")
def bad_commit(root):
    return _base(_src(root), root, "io.commit=fast")


# ---------------------------------------------------------------- target

@case("the target exists and is not empty", "TargetError", "exists and is not empty; pass overwrite=true")
def target_exists(root):
    out = os.path.join(root, "out")
    os.makedirs(out)
    open(os.path.join(out, "precious.txt"), "w").write("keep")
    return _base(_src(root), root)


@case("the target is inside the source", "TargetError", "overlaps the source")
def target_in_source(root):
    src = _src(root)
    return [f"source.path={src}", f"target.path={os.path.join(src, 'mcore')}"]


@case("the target's parent is a file", "TargetError", "is a file, not a directory")
def parent_is_file(root):
    open(os.path.join(root, "afile"), "w").write("x")
    return [f"source.path={_src(root)}", f"target.path={os.path.join(root, 'afile', 'out')}"]


@case("a target name longer than NAME_MAX", "TargetError", "choose a shorter target.path")
def long_name(root):
    return [f"source.path={_src(root)}", f"target.path={os.path.join(root, 'x' * 300)}"]


@case("the target is being written by another run", "TargetError", "is being written by another reshard run")
def target_claimed(root):
    from reshard.staging import Owner, _write_owner, lock_path

    out = os.path.join(root, "out")
    _write_owner(lock_path(out), Owner("other0000000", pid=os.getpid()), exclusive=True)
    return _base(_src(root), root)


def run_case(build, root):
    """The error a case gets from a real conversion in this process, or None."""
    return convert_overrides(build(root), root)


def convert_overrides(overrides, root):
    from reshard import config
    from reshard.errors import ReshardError
    from reshard.run import convert

    overrides = overrides + ["io.progress=none", f"paths.root={root}"]
    try:
        cfg = config.compose(overrides)
        config.validate(cfg)
        convert(cfg)
    except ReshardError as e:
        return e
    return None


def one_line(e, root) -> str:
    lines = str(e).replace(root + os.sep, "").replace(root, ".").splitlines()
    text = lines[0] + (" " + lines[1].strip() if len(lines) > 1 and lines[0].endswith(":") else "")
    return f"{type(e).__name__}: {text}"


def main():
    import tempfile

    rows = []
    for name, desc, cls, needle, build in CASES:
        root = tempfile.mkdtemp(prefix="bad-")
        e = run_case(build, root)
        rows.append(f"| {desc} | `{one_line(e, root) if e else 'NO ERROR'}` |".replace("\n", " "))
        shutil.rmtree(root, ignore_errors=True)
    print("| bad input | the line |\n|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
