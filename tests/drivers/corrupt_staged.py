"""torchrun driver: the writer on one rank damages what it wrote (a fault injected into reshard's
own writer, after the file is on disk); verification must catch it before the commit.

    torchrun --nproc-per-node N tests/drivers/corrupt_staged.py SRC TARGET FORMAT MODE TENSOR OUTDIR

MODE ``flip``: one bit of TENSOR's first element is flipped in the written file (hf target).
MODE ``drop``: the writer leaves TENSOR (a name inside the file) out (megatron_legacy target).
Each rank writes ``OUTDIR/rank<r>.txt``: ``FAILED <ExceptionClass>: <message>`` or ``OK``.
"""

import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard import config, run  # noqa: E402
from tests import procgroup  # noqa: E402
from reshard.formats import hf, megatron_legacy  # noqa: E402


def main():
    src, target, fmt, mode, tensor, outdir = sys.argv[1:7]
    rank = int(os.environ["RANK"])
    if mode == "flip":
        orig = hf.Target.write_file

        def flip(self, job, sink, file, items, emitter):
            n = orig(self, job, sink, file, items, emitter)
            if any(t.name == tensor for t, _ in items):
                sink.flush()
                with open(sink.name, "r+b") as f:
                    (hlen,) = struct.unpack("<Q", f.read(8))
                    start = json.loads(f.read(hlen))[tensor]["data_offsets"][0]
                    f.seek(8 + hlen + start)
                    b = f.read(1)
                    f.seek(8 + hlen + start)
                    f.write(bytes([b[0] ^ 0x01]))
            return n
        hf.Target.write_file = flip
    else:
        orig = megatron_legacy.Target.obj

        def drop(self, job, file, tensors):
            return orig(self, job, file, {n: t for n, t in tensors.items() if not n.endswith(tensor)})
        megatron_legacy.Target.obj = drop
    overrides = [f"source.path={src}", f"target.path={target}", f"target.format={fmt}",
                 f"paths.root={os.path.dirname(target)}", "io.progress=none"]
    if fmt == "megatron_legacy":
        overrides += ["parallel.target_tp=2", "parallel.target_pp=2"]
    try:
        rep = run.convert(config.compose(overrides))
        verdict = f"OK {json.dumps(rep.get('verify'))}"
    except Exception as e:
        verdict = f"FAILED {type(e).__name__}: {e}"
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(verdict)
    procgroup.finish()


if __name__ == "__main__":
    main()
