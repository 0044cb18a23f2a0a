"""Issue 16.1, one world: jobs started by `fleetmpi run` are ledger jobs for `status` and `cancel`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, events, write_spec


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _spec(tmp: Path, data: Path, name: str, **goal: Any) -> Path:
    return write_spec(tmp / f"{name}.yaml", data, name=name, model={"kind": "linear"},
                      optimizer={"lr": 0.01, "batch": 50}, goal=goal, checkpoint={"every_steps": 10**6},
                      monitor={"log_every_steps": 5, "eval_every_steps": 1000})


def test_status_lists_a_job_that_run_started(tmp_path: Path, datasets: dict) -> None:
    jd = tmp_path / "runs" / "short"
    cli("run", str(_spec(tmp_path, datasets["regression"], "short", max_steps=12)), "--job-dir", str(jd), check=True)
    listed = json.loads(cli("status", "--json", check=True).stdout)
    [rec] = [r for r in listed if Path(r["job_dir"]) == jd.resolve()]
    assert rec["status"] == "COMPLETED" and rec["name"] == "short" and rec["step"] == 12
    one = json.loads(cli("status", str(rec["id"]), "--json", check=True).stdout)
    assert one["allocations"][0]["backend"] == "local" and one["allocations"][0]["exit_code"] == 0


@pytest.mark.slow
def test_cancel_by_job_dir_stops_a_run_after_a_checkpoint(tmp_path: Path, datasets: dict) -> None:
    jd = tmp_path / "runs" / "long"
    spec = _spec(tmp_path, datasets["regression"], "long", max_steps=10**7)
    env = {**os.environ, "FLEETMPI_PROGRESS": "none"}
    run = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "run", str(spec), "--job-dir", str(jd)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (jd / "events.jsonl").exists() or not any(e["event"] == "first_step" for e in events(jd)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        proc = cli("cancel", str(jd))
        assert proc.returncode == 0, proc.stderr
        assert "SIGTERM sent to 1 allocation" in proc.stderr
        assert run.wait(timeout=120) == 4
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate()
    assert [e for e in events(jd) if e["event"] == "checkpoint"][-1]["reason"] == "signal SIGTERM"
    [rec] = json.loads(cli("status", "--json", check=True).stdout)
    assert rec["status"] == "CANCELLED" and rec["job_dir"] == str(jd.resolve())
