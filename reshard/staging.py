"""Atomic output: stage beside the target, commit by rename (DESIGN.md "Atomic").

The staging directory is a hidden sibling (``.<name>.reshard-staging-<id>``) so a failed or
interrupted run never leaves anything that looks like a checkpoint at the target path.
"""

from __future__ import annotations

import os
import shutil

from .errors import TargetError


def check_target(target: str, source: str, overwrite: bool) -> None:
    t, s = os.path.realpath(target), os.path.realpath(source)
    if t == s or s.startswith(t + os.sep) or t.startswith(s + os.sep):
        raise TargetError(f"target {target} overlaps the source {source}; write the conversion elsewhere")
    if os.path.exists(t):
        if not os.path.isdir(t):
            raise TargetError(f"target {target} exists and is not a directory")
        if os.listdir(t) and not overwrite:
            raise TargetError(f"target {target} exists and is not empty; pass overwrite=true to replace it "
                              "or choose another target.path")
    parent = os.path.dirname(t) or "."
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise TargetError(f"cannot write into {parent} (permission denied)")


def staging_dir(target: str, run_id: str) -> str:
    t = os.path.realpath(target)
    return os.path.join(os.path.dirname(t), f".{os.path.basename(t)}.reshard-staging-{run_id}")


def commit(staging: str, target: str) -> None:
    """Replace ``target`` by ``staging`` with renames only."""
    t = os.path.realpath(target)
    old = None
    if os.path.exists(t):
        old = staging + "-old"
        os.rename(t, old)
    os.rename(staging, t)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def discard(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)
