"""torchrun driver: run several conversions in one process group, as multirun jobs do.

    torchrun --nproc-per-node N tests/drivers/convert_jobs.py JOBS.json RESULTS.json

JOBS.json is a list of override lists (the real conf/ is composed for each). Rank 0 writes
RESULTS.json: one entry per job, "ok" or the error's class and message.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))

from reshard import config, dist as rdist  # noqa: E402
from reshard.errors import ReshardError  # noqa: E402
from reshard.run import convert  # noqa: E402
from tests import procgroup  # noqa: E402


def main():
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for overrides in jobs:
        cfg = config.compose(overrides)
        try:
            config.validate(cfg)
            convert(cfg)
            results.append({"ok": True})
        except ReshardError as e:
            results.append({"ok": False, "error": type(e).__name__, "message": str(e)})
    if rdist.rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2)
    procgroup.finish()  # an ordinary interpreter exit follows, as in a user's own script


if __name__ == "__main__":
    main()
