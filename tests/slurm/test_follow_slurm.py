"""Interrupting `fleetmpi submit --wait` (what a workflow engine does) on the minicluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401  (a fixture)

from fleetmpi.launch.slurm import cmd as slurm_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _events(job: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _follower(tmp_path: Path, data: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"}}}
    spec = write_spec(tmp_path / f"{name}.yaml", data, name=name, fleet=fleet, goal={"max_steps": 10_000_000},
                      checkpoint={"every_steps": 100_000, "keep": 2},
                      monitor={"log_every_steps": 1, "eval_every_steps": 50},
                      scheduler={"backend": "slurm", "submit_backoff_s": 0.2})
    job = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "submit", str(spec), "--wait", "--job-dir",
                             str(job), *extra], env={**os.environ, "FLEETMPI_PROGRESS": "none"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(e["event"] == "first_step" for e in _events(job)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, job


def test_sigterm_to_the_follower_cancels_the_chain_after_a_checkpoint_and_exits_4(
        tmp_path: Path, datasets: dict) -> None:
    proc, job = _follower(tmp_path, datasets["multiclass"], "stopme")
    jid = next(e["job_id"] for e in _events(job) if e["event"] == "slurm_submit")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        subprocess.run(["scancel", jid])   # before the change the job ran on (a 10M-step budget)
    assert proc.returncode == 4, err
    assert slurm_cmd.squeue_states([jid]).get(jid) not in ("RUNNING", "PENDING")
    assert [json.loads(r) for r in (job / "slurm" / "chain.jsonl").read_text().splitlines()][-1]["status"] == "CANCELLED"
    kinds = [e["event"] for e in _events(job)]
    assert "cancel_requested" in kinds and "checkpoint" in kinds, kinds
    assert f"got SIGTERM: cancelled Slurm job {jid}" in err, err
    assert err.strip().splitlines()[-1] == (f"fleetmpi: stopped on SIGTERM; `fleetmpi submit {job} --wait` resumes "
                                            "from the newest checkpoint"), err


def test_detach_on_exit_leaves_the_job_running(tmp_path: Path, datasets: dict) -> None:
    proc, job = _follower(tmp_path, datasets["multiclass"], "detached", "--detach-on-exit")
    jid = next(e["job_id"] for e in _events(job) if e["event"] == "slurm_submit")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGTERM
        time.sleep(2)
        assert slurm_cmd.squeue_states([jid]).get(jid) == "RUNNING"
    finally:
        subprocess.run(["scancel", jid])
