"""Every bad input of the README's troubleshooting table gets its one line and loses nothing:
no target (or the existing one untouched), nothing left beside it, the source unchanged."""

import hashlib
import os

import pytest

from bad_inputs import CASES, convert_overrides, one_line
from reshard.staging import leftovers


def _digest(path):
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(d, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("name,desc,cls,needle,build", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_loses_nothing(tmp_path, name, desc, cls, needle, build):
    root = str(tmp_path)
    overrides = build(root)
    src = next((o.split("=", 1)[1] for o in overrides if o.startswith("source.path=")), "")
    src_digest = _digest(src) if os.path.isdir(src) else None
    e = convert_overrides(overrides, root)
    assert e is not None, f"{desc}: no error"
    assert type(e).__name__ == cls, one_line(e, root)
    assert needle in str(e), one_line(e, root)
    out = os.path.join(root, "out")
    if name == "target_exists":
        assert open(os.path.join(out, "precious.txt")).read() == "keep"
    elif name != "target_claimed":
        assert not os.path.exists(out)
        assert [p for p in leftovers(out)] == []
    else:  # the other run's claim is still its own
        from reshard.staging import lock_path, read_owner

        assert read_owner(lock_path(out)).run_id == "other0000000"
    if src_digest is not None:
        assert _digest(src) == src_digest  # the source never changes a byte


def test_the_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_a_240_character_target_name_converts(tmp_path):
    """The staging and lock names beside it are shortened with a hash (NAME_MAX is 255 bytes)."""
    from bad_inputs import _src

    root = str(tmp_path)
    target = os.path.join(root, "t" * 240)
    assert convert_overrides([f"source.path={_src(root)}", f"target.path={target}"], root) is None
    assert os.path.isfile(os.path.join(target, "release", ".metadata")) and leftovers(target) == []


@pytest.mark.parametrize("case", ["short_span", "overlapping", "trailing_bytes"])
def test_inspect_and_compare_refuse_a_malformed_safetensors_header(tmp_path, case):
    """Before: compare said EQUAL and inspect "problems: none" (both read through the same index)."""
    import subprocess
    import sys

    from bad_inputs import CASES, REPO, _src

    root = str(tmp_path)
    good = _src(root, "good")
    next(c for c in CASES if c[0] == case)[4](root)
    env = dict(os.environ, PYTHONPATH=REPO)
    ins = subprocess.run([sys.executable, "-m", "reshard", "inspect", os.path.join(root, "hf")],
                         capture_output=True, text=True, env=env)
    assert ins.returncode == 1 and "PROBLEMS:" in ins.stdout and "corrupt" in ins.stdout, ins.stdout[-2000:]
    assert ins.stdout.count("the safetensors library refuses") == 1
    cmp = subprocess.run([sys.executable, "-m", "reshard", "compare", os.path.join(root, "hf"), good],
                         capture_output=True, text=True, env=env)
    assert cmp.returncode != 0 and "corrupt" in cmp.stdout + cmp.stderr and "EQUAL" not in cmp.stdout
