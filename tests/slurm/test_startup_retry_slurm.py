"""A step whose ranks die before they are all up starts once more; a second such death ends the job.

Ranks that hang in MPI_Init instead (4 ranks sat 30 minutes in a read() in libmpi under
srun, once) are ended by the batch script after $FLEETMPI_MPI_INIT_DEADLINE_S and count
as such a death.

MPICH's PMI-2 client now and then aborts in MPI_Init under srun (SIGABRT after a malformed
request; 5 of ~8,400 tasks in the minicluster's slurmd logs). No rank has written
anything then, so the batch script starts the step again, once (script.STEP_TRIES). The
srun fault injector (tests/slurm/fault_injectors/) makes the first N worker steps' tasks
abort at start-up, through the real srun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import events, write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

INJECTOR = Path(__file__).parent / "fault_injectors" / "srun_fault_injector.py"


def _submit(tmp_path: Path, datasets: dict, aborts: int, mode: str = "abort-start",
            extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    bindir = tmp_path / "fault-bin"
    bindir.mkdir()
    (bindir / "srun").symlink_to(INJECTOR)
    log = tmp_path / "srun-calls.jsonl"
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"}}}
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], name="startretry", fleet=fleet,
                      goal={"max_steps": 20}, monitor={"log_every_steps": 10, "eval_every_steps": 10},
                      scheduler={"backend": "slurm", "submit_backoff_s": 0.2})
    job = tmp_path / "job"
    env = {**os.environ, "FLEETMPI_PROGRESS": "none", "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "FLEETMPI_FAULT_SRUN": f"{mode}:{aborts}", "FLEETMPI_FAULT_SRUN_LOG": str(log), **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "fleetmpi.cli", "submit", str(spec), "--wait", "--json",
                           "--job-dir", str(job)], env=env, capture_output=True, text=True, timeout=240)
    calls = [c for c in map(json.loads, log.read_text().splitlines()) if "fleetmpi.engine.worker" in c["argv"]]
    return proc, job, calls


def _slurm_log(job: Path) -> str:
    return "".join(p.read_text() for p in sorted((job / "logs").glob("slurm-*.out")))


def test_ranks_that_die_before_they_are_up_start_once_more(tmp_path: Path, datasets: dict) -> None:
    proc, job, calls = _submit(tmp_path, datasets, aborts=1)
    assert proc.returncode == 0, proc.stderr
    assert [c["fault"] for c in calls] == ["abort-start", None]
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "COMPLETED", state
    starts = [e for e in events(job) if e["event"] == "phase_start"]
    assert len(starts) == 1 and starts[0]["step_try"] == 2, starts
    assert starts[0]["retried_after_exit_code"] > 128, starts   # the aborted tasks' signal
    log = _slurm_log(job)
    assert "before all were up; starting the step once more" in log, log
    assert "step started again (try 2)" in log, log
    assert not list((job / "slurm").glob(".*.up")), "the up flag outlived its step"
    assert [r["exit_code"] for r in json.loads(proc.stdout)["chain"]] == [0]


def test_a_second_death_before_start_ends_the_job_as_crashed(tmp_path: Path, datasets: dict) -> None:
    proc, job, calls = _submit(tmp_path, datasets, aborts=5)
    assert proc.returncode not in (0, None), proc.stderr
    assert [c["fault"] for c in calls] == ["abort-start", "abort-start"]   # one more start, not more
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "FAILED", state
    assert "killed or crashed" in state.get("reason", ""), state
    assert not [e for e in events(job) if e["event"] == "phase_start"]
    assert _slurm_log(job).count("starting the step once more") == 1


DEADLINE = {"FLEETMPI_MPI_INIT_DEADLINE_S": "5"}


def test_ranks_that_hang_in_mpi_init_are_ended_and_started_once_more(tmp_path: Path, datasets: dict) -> None:
    proc, job, calls = _submit(tmp_path, datasets, aborts=1, mode="hang-start", extra_env=DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert [c["fault"] for c in calls] == ["hang-start", None]
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "COMPLETED", state
    starts = [e for e in events(job) if e["event"] == "phase_start"]
    assert len(starts) == 1 and starts[0]["step_try"] == 2, starts
    assert starts[0]["retried_after_mpi_init_s"] == 5, starts
    assert starts[0]["retried_after_exit_code"] > 128, starts
    log = _slurm_log(job)
    assert "not all through MPI_Init after 5 s; ending the step" in log, log
    assert "were not all through MPI_Init after 5 s" in log.split("step started again")[1], log
    assert not list((job / "slurm").glob(".*.mpi")) and not list((job / "slurm").glob(".*.stalled"))


def test_ranks_that_hang_in_mpi_init_twice_end_the_job_with_the_reason(tmp_path: Path, datasets: dict) -> None:
    t0 = time.monotonic()
    proc, job, calls = _submit(tmp_path, datasets, aborts=5, mode="hang-start", extra_env=DEADLINE)
    assert proc.returncode not in (0, None), proc.stderr
    assert [c["fault"] for c in calls] == ["hang-start", "hang-start"]
    assert time.monotonic() - t0 < 120          # the tasks would sleep an hour
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "FAILED", state
    assert "not all through MPI_Init after 5 s" in state.get("reason", ""), state
    exits = [e for e in events(job) if e["event"] == "slurm_exit"]
    assert exits and exits[-1]["mpi_init_deadline_s"] == 5, exits
    assert not [e for e in events(job) if e["event"] == "phase_start"]
