"""torchrun driver: one rank fails while writing (a fault injected into reshard's own code,
not into torch.distributed); every rank must stop with an error and nothing be committed.

    torchrun --nproc-per-node N tests/drivers/fail_on_rank.py SRC TARGET FAILING_RANK PHASE OUTDIR

PHASE: "write" (inside the DCP save) or "exchange" (while reading for a round) or "commit".
Each rank writes ``OUTDIR/rank<r>.txt``: ``FAILED <ExceptionClass>: <message>`` or ``OK``, and
exits 0, so that torchrun does not stop the other ranks before they report.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard import config, run  # noqa: E402
from tests import procgroup  # noqa: E402


def main():
    src, target, failing, phase, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    rank = int(os.environ["RANK"])
    if rank == failing:
        def boom(*a, **k):
            raise OSError(f"injected failure on rank {rank} ({phase})")
        if phase == "write":
            run.PieceSource.payload = boom
        elif phase == "exchange":
            run.PieceSource.read = boom
        elif phase == "commit":
            run.commit = boom
    overrides = [f"source.path={src}", f"target.path={target}", "parallel.target_tp=2", "parallel.target_pp=2",
                 f"paths.root={os.path.dirname(target)}", "io.progress=none"]
    if phase == "exchange":
        overrides.append("io.assign=layout")
    try:
        run.convert(config.compose(overrides))
        verdict = "OK"
    except Exception as e:
        verdict = f"FAILED {type(e).__name__}: {e}"
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(verdict)
    procgroup.finish()


if __name__ == "__main__":
    main()
