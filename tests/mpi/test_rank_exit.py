"""A rank's fast exit (rank_end.exit_now) must not look like a crash to mpiexec.

Ranks leave right after MPI_Finalize, skipping Python's teardown. Leaving by os._exit made
hydra take some exits for crashes and SIGKILL the ranks still on their way out, so a
phase that ended cleanly reported rc 9. Ranks here leave 0.3 s apart, the spread that
triggered it in about one run in three.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MPIEXEC, ROOT

SCRIPT = """
import sys, time
from mpi4py import MPI
from fleetmpi.engine.rank_end import exit_now
rank = MPI.COMM_WORLD.Get_rank()
MPI.Finalize()          # as exit_now would; the spread comes after it, as between real ranks
if rank != 0:
    time.sleep(0.3)
exit_now(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_staggered_fast_exits_give_mpiexec_the_ranks_code(code: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = []
    for _ in range(6):
        proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, "-c", SCRIPT, str(code)], env=env,
                              capture_output=True, text=True, timeout=120)
        got.append(proc.returncode)
    assert got == [code] * 6, got
