#!/usr/bin/env python3
"""FAULT INJECTOR, a fake for tests only: an ``sbatch`` that fails the way sbatch does.

Slurm cannot be made to time out or refuse a submission on demand, so the Slurm tests
put a link named ``sbatch`` to this file first on PATH. It hands every call to the real
sbatch (the next one on PATH) except the submissions ``FLEETMPI_FAULT_SBATCH`` names:

  timeout-after-submit:N  the first N submissions DO reach Slurm (the job exists), then
                          report "Socket timed out on send/recv operation", exit 1
  transient:N             the first N fail with "Unable to contact slurm controller", no job
  qos:N                   the first N fail with QOSMaxSubmitJobPerUserLimit, no job
  permanent               every submission fails with "Requested node configuration is
                          not available", no job

``--test-only`` calls always go to the real sbatch. Each call is logged as one JSON line
to ``FLEETMPI_FAULT_SBATCH_LOG`` (argv, whether it was a submission, what was injected).
Standard library only: it runs under whichever python3 is on PATH.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))   # the link's target folder
from real_command import real_command


def main() -> int:
    args = sys.argv[1:]
    log = os.environ.get("FLEETMPI_FAULT_SBATCH_LOG")
    mode, _, count = os.environ.get("FLEETMPI_FAULT_SBATCH", "").partition(":")
    submission = "--test-only" not in args
    earlier = 0
    if log and os.path.exists(log):
        with open(log) as f:
            earlier = sum(1 for line in f if json.loads(line)["submission"])
    fault = None
    if submission and mode == "permanent":
        fault = "permanent"
    elif submission and mode in ("timeout-after-submit", "transient", "qos") and earlier < int(count or 1):
        fault = mode
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": args, "submission": submission, "fault": fault}) + "\n")
    if fault is None:
        os.execv(real_command("sbatch"), ["sbatch", *args])
    if fault == "timeout-after-submit":
        subprocess.run([real_command("sbatch"), *args], capture_output=True)  # the job is created; the answer is lost
        print("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", file=sys.stderr)
    elif fault == "transient":
        print("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
              file=sys.stderr)
    elif fault == "qos":
        print("sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
              "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)", file=sys.stderr)
    else:
        print("sbatch: error: Batch job submission failed: Requested node configuration is not available",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
