#!/usr/bin/env python3
"""FAULT INJECTOR, a fake for tests only: an ``srun`` whose first steps' ranks abort at start-up.

MPICH's PMI-2 client now and then aborts in MPI_Init under srun (SIGABRT, before any rank
is up); Slurm cannot be made to do that on demand. The Slurm tests put a link named
``srun`` to this file first on PATH (the batch script finds srun on the PATH that sbatch
exported). With ``FLEETMPI_FAULT_SRUN=abort-start:N`` the first N steps of the job dir run
through the real srun with the same options, but each task is a Python that aborts at once
instead of the worker; with ``hang-start:N`` each task sleeps for an hour instead, as ranks
that hang in MPI_Init do (never reaching the worker's MPI barrier). Later steps, and every
other srun call, go to the real srun as written. Each call is logged as one JSON line to ``FLEETMPI_FAULT_SRUN_LOG`` (argv, what
was injected). Standard library only: it runs under whichever python3 is on PATH.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))   # the link's target folder
from real_command import real_command

WORKER = "fleetmpi.engine.worker"


def main() -> int:
    args = sys.argv[1:]
    log = os.environ.get("FLEETMPI_FAULT_SRUN_LOG")
    mode, _, count = os.environ.get("FLEETMPI_FAULT_SRUN", "").partition(":")
    earlier = 0
    if log and os.path.exists(log):
        with open(log) as f:
            earlier = sum(1 for line in f if json.loads(line)["fault"])
    fault = None
    tasks = {"abort-start": "import os; os.abort()", "hang-start": "import time; time.sleep(3600)"}
    if mode in tasks and WORKER in args and earlier < int(count or 1):
        fault = mode
        at = args.index(WORKER)   # ... PYTHON -m fleetmpi.engine.worker JOB_DIR
        args = [*args[:at - 1], "-c", tasks[mode]]
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "fault": fault}) + "\n")
    os.execv(real_command("srun"), ["srun", *args])
    return 1


if __name__ == "__main__":
    sys.exit(main())
