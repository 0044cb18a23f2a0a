"""The ranks' side of the Slurm batch script's start-up watch, under real mpiexec.

The script ends a step whose ranks have not all got through MPI_Init by a deadline
($FLEETMPI_MPI_UP_FILE missing), and starts a step again only if its ranks died before all
were up ($FLEETMPI_UP_FILE missing). A worker that stopped creating either flag would have
every long Slurm phase killed at the deadline, or a crash after start-up rerun; the Slurm
tests' phases are too short to show the first. Here the flags are asked for under plain
mpiexec and must exist after the run (the local launcher passes its environment on).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli, events, write_spec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks", [1, 3])
def test_rank_zero_creates_both_start_up_flags(tmp_path: Path, datasets: dict, ranks: int) -> None:
    mpi_up, up = tmp_path / "flag.mpi", tmp_path / "flag.up"
    spec = write_spec(tmp_path / "s.yaml", datasets["binary"], model={"kind": "logistic"}, goal={"max_steps": 10},
                      fleet={"start": "p", "phases": {"p": {"ranks_per_node": ranks}}})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"),
               env={"FLEETMPI_MPI_UP_FILE": str(mpi_up), "FLEETMPI_UP_FILE": str(up), "FLEETMPI_OVERSUBSCRIBE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert mpi_up.exists() and up.exists()
    assert [e["ranks"] for e in events(tmp_path / "job") if e["event"] == "phase_start"] == [ranks]
