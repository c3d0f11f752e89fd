"""The start and the end of a process group in the tests' own torchrun scripts.

:func:`finish` is also a check: after ``destroy_process_group`` no gloo thread may be left. A
group kept alive past it (see :func:`reshard.dist.before_init`) aborts the interpreter's exit
now and then, after the job succeeded; the check makes that a failure every time.
"""

import gc
import sys
import time

import torch.distributed as dist

from reshard import dist as rdist


def init_gloo() -> None:
    rdist.before_init()
    dist.init_process_group("gloo")


def finish() -> None:
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:  # Megatron-core keeps its groups in module globals until told otherwise
        ps.destroy_model_parallel()
        # megatron-core 0.19.2's destroy_model_parallel forgets _INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP
        # and its _GLOO twin: clear whatever group it left
        for k, v in list(vars(ps).items()):
            if isinstance(v, dist.ProcessGroup):
                setattr(ps, k, None)
        gc.collect()  # models that referenced its groups, left in reference cycles
    if dist.is_initialized():
        dist.destroy_process_group()
    # a destroyed group's loop thread exits on its own schedule: on a loaded machine (2 cores, several jobs)
    # that can take a moment; a thread still there after 10 s is held by something
    deadline = time.monotonic() + 10
    while (left := rdist.gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        print(f"rank-local check failed: {left} gloo thread(s) still running after destroy_process_group "
              "(something holds the process group)", file=sys.stderr, flush=True)
        sys.exit(3)
