"""Compare two DCP checkpoints tensor by tensor, bit for bit: ``compare_dcp.py A B``.
Exits 1 naming every differing tensor."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from reshard.formats.torch_dist import load_full  # noqa: E402


def main():
    (ta, oa), (tb, ob) = load_full(sys.argv[1]), load_full(sys.argv[2])
    bad = sorted(set(ta) ^ set(tb))
    bad += [k for k in sorted(set(ta) & set(tb)) if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    bad += sorted(k for k in set(oa) ^ set(ob))
    n = sum(t.numel() for t in ta.values())
    if bad:
        print(f"DIFFERENT: {len(bad)} tensor(s): {bad}")
        sys.exit(1)
    print(f"IDENTICAL: {len(ta)} tensors, {n} elements, {len(oa)} objects")


if __name__ == "__main__":
    main()
