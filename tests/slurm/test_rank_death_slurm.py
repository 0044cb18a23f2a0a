"""A rank killed outright on Slurm ends its job: srun --wait, not a hang until the time limit.

A rank that dies without MPI_Abort (SIGKILL from the OOM killer, a native abort in MPI or
UCX) leaves its peers waiting in a collective. srun kills the remaining tasks only once
--wait seconds have passed after the first task ended; Slurm's default waits for ever. The
rendered script passes --wait (script.SRUN_WAIT_S, 60 s); this test sets 5 s through
scheduler.launcher_args, which follow it on srun's line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import events, write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def _ranks(job: Path) -> list[psutil.Process]:
    """Return the worker processes of the job dir ``job`` (its ranks on the minicluster's nodes)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd[1:3] == ["-m", "fleetmpi.engine.worker"] and str(job) in cmd:   # not srun's own line
            out.append(p)
    return out


def test_a_rank_killed_outright_ends_the_job_as_crashed_instead_of_hanging(tmp_path: Path, datasets: dict) -> None:
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"}}}
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], name="killed", fleet=fleet,
                      goal={"max_steps": 10_000_000}, checkpoint={"every_steps": 10_000_000, "keep": 2},
                      monitor={"log_every_steps": 50, "eval_every_steps": 10_000_000},
                      scheduler={"backend": "slurm", "submit_backoff_s": 0.2, "launcher_args": ["--wait=5"]})
    job = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "submit", str(spec), "--wait", "--json",
                             "--job-dir", str(job)], env={**os.environ, "FLEETMPI_PROGRESS": "none"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(e["event"] == "first_step" for e in (events(job) if (job / "events.jsonl").exists() else [])):
            assert time.monotonic() < deadline, "the job never reached its first step"
            time.sleep(0.2)
        ranks = _ranks(job)
        assert len(ranks) == 2, ranks
        victim = max(ranks, key=lambda p: p.pid)
        victim.send_signal(signal.SIGKILL)
        # Without srun --wait the other rank spins in its next collective until the time limit.
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            for p in _ranks(job):
                p.kill()
    assert proc.returncode not in (0, None), stderr
    out = json.loads(stdout)
    assert [r["exit_code"] for r in out["chain"]] != [0]
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "FAILED", state
    assert not _ranks(job)
