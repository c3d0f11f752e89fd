"""reshard: convert and reshard LLM checkpoints on the cluster that trains them.

One entry point for a single process and for torchrun / srun (the rank environment is read
in ``reshard/dist.py``)::

    python -m reshard source.path=ckpt/hf target.path=ckpt/mcore parallel.target_tp=2
    torchrun --nproc-per-node 8 -m reshard +model=llama2_7b parallel.target_tp=8
    python -m reshard --multirun +model=llama3_8b parallel.target_tp=1,2,4,8
    python -m reshard inspect <dir> [--json]
    python -m reshard compare <a> <b> [--atol X]      (also under torchrun: shared out over ranks)
    python -m reshard clean <target> [--force]        (what interrupted runs left beside a target)

Under torchrun every rank composes the same config; only rank 0 writes Hydra's output files
and logs to the console, the other ranks log to ``${paths.log_dir}``.
"""

from __future__ import annotations

import gc

gc.disable()  # importing torch, hydra and DCP makes ~10^6 objects: no collection until they are in (job())

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import hydra
from omegaconf import DictConfig  # noqa: E402

from . import config, launch  # noqa: E402
from .dist import detect_env  # noqa: E402
from .errors import ReshardError  # noqa: E402
from .signals import interrupts_deferred, stop_on_signals  # noqa: E402

log = logging.getLogger("reshard")
_failures = []


def _quiet_rank_overrides(rank: int):
    """Overrides that keep ranks > 0 from writing Hydra's output files or logging to the console."""
    if rank == 0:
        return []
    # A sweep still writes multirun.yaml into its sweep dir: keep that beside this rank's log.
    return ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null",
            "hydra.run.dir=.", f"hydra.sweep.dir=${{paths.log_dir}}/hydra_rank{rank}", "hydra.sweep.subdir=."]


def _rank_logging(cfg: DictConfig, rank: int) -> None:
    level = getattr(logging, str(cfg.log_level).upper(), logging.INFO)
    logging.getLogger("reshard").setLevel(level)
    if rank == 0:
        return
    os.makedirs(cfg.paths.log_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(str(cfg.target.path)))
    handler = logging.FileHandler(os.path.join(cfg.paths.log_dir, f"{name}.rank{rank}.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def _traceback_to_log_files(e: BaseException) -> list:
    """The traceback of ``e`` into this rank's log file(s) only, never the console."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback of %s", (type(e).__name__,),
                         (type(e), e, e.__traceback__))
    for h in files:
        h.handle(rec)
    return [h.baseFilename for h in files]


def job(cfg: DictConfig) -> None:
    from .run import convert

    gc.freeze()  # what the imports made is permanent: never scanned again
    gc.enable()
    rank = detect_env().rank
    _rank_logging(cfg, rank)
    with stop_on_signals():  # until the line is printed: torchrun's SIGTERM follows a failure at once
        try:
            config.validate(cfg)
            convert(cfg)
        except Exception as e:  # one line per failure; the traceback goes to the rank's log file
            with interrupts_deferred():  # torchrun's SIGTERM may come at any moment now: it waits
                _report_failure(e, rank)
                if os.environ.get("SUBMITIT_EXECUTOR"):
                    raise  # one Slurm job per sweep point: the job itself must fail so the sweep sees it
                _failures.append(str(cfg.target.path))


def _report_failure(e: BaseException, rank: int) -> None:
    where = _traceback_to_log_files(e)
    if isinstance(e, ReshardError):
        log.error("%s: %s", type(e).__name__, e)
    else:
        log.error("InternalError on rank %d: %s: %s - nothing was committed; this is a bug in reshard, please "
                  "report it with the traceback from %s", rank, type(e).__name__, e,
                  where[0] if where else "the rank's log")


TOOLS = {"inspect": "reshard.inspect", "compare": "reshard.compare", "clean": "reshard.staging"}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in TOOLS:  # reshard inspect <dir> / reshard compare <a> <b>
        import importlib

        return importlib.import_module(TOOLS[sys.argv[1]]).main(sys.argv[2:])
    nproc = launch.requested(sys.argv[1:])
    if nproc and nproc > 1:
        launch.start(nproc, sys.argv[1:], launch.grace(sys.argv[1:]))  # returns in each of the ranks it forks
    from . import faults

    faults.point("start")
    return _main()


def _main() -> int:
    config.register()
    rank = detect_env().rank
    sys.argv += _quiet_rank_overrides(rank)
    import torch.distributed as dist

    try:
        hydra.main(version_base="1.3", config_path=config.CONF_DIR, config_name="config")(job)()
    finally:  # also when Hydra exits on an unexpected error: leave no gloo/NCCL thread behind
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a peer already gone: its failure was reported above, exit as planned
                pass
    if _failures:
        if rank == 0 and len(_failures) > 1:
            log.error("%d job(s) failed: %s", len(_failures), ", ".join(_failures))
        return 1
    return 0


def cli() -> None:
    """The console script and ``python -m reshard``: after the last line is out, exit at once -
    the interpreter's own teardown of torch's modules takes longer than a small conversion."""
    try:
        rc = main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    cli()
