"""Issue 16.4/16.5, watching a run: `status` shows progress and a pending approval; `events --follow` tails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, events, write_spec


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_status_of_a_running_job_shows_progress_and_the_approve_command_events_follow_tails(
        tmp_path: Path, datasets: dict) -> None:
    jd = tmp_path / "runs" / "watched"
    fleet = {"start": "one", "approval": "manual",
             "phases": {"one": {"nodes": 1, "ranks_per_node": 1}, "two": {"nodes": 1, "ranks_per_node": 2}},
             "rules": [{"in": "one", "when": "step >= 20", "then": {"goto": "two"}}]}
    spec = write_spec(tmp_path / "watched.yaml", datasets["multiclass"], name="watched", fleet=fleet,
                      goal={"max_steps": 10**7}, checkpoint={"every_steps": 10**6},
                      monitor={"log_every_steps": 5, "eval_every_steps": 10})
    env = {**os.environ, "FLEETMPI_PROGRESS": "none"}
    run = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "run", str(spec), "--job-dir", str(jd)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follow = None
    try:
        deadline = time.monotonic() + 180
        while not (jd / "events.jsonl").exists() or not any(e["event"] == "approval_pending" for e in events(jd)):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        follow = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "events", str(jd), "--follow", "--json"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        info = json.loads(cli("status", str(jd), "--json", check=True).stdout)
        live = info["live"]
        assert live["phase"] == "one" and live["ranks"] == 1 and live["step"] >= 20 and live["epoch"] > 0
        assert live["loss"] > 0 and 0 <= live["valid_accuracy"] <= 1 and live["valid_loss"] > 0
        assert live["sync_bytes_per_step"] > 0 and live["phase_elapsed_s"] >= 0
        assert live["pending_approval"]["goto"] == "two"
        assert live["pending_approval"]["command"] == f"fleetmpi approve {jd}"
        text = cli("status", str(jd), check=True).stdout
        assert "phase one x1 for " in text and " valid_accuracy " in text and "/step" in text, text
        assert f"rescale to two waits for approval since step 20 (rule 0); training goes on in phase one " \
               f"meanwhile: fleetmpi approve {jd}" in text, text
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 4
        out, _ = follow.communicate(timeout=30)   # ends by itself: the job stopped
        kinds = [json.loads(line)["event"] for line in out.splitlines()]
        assert kinds[0] == "job_created" or "phase_start" in kinds
        # The phase's exit is the last word of the job; the launcher's calling off of the
        # pre-started next phase (nothing of it ran) may follow it.
        ran = [k for k in kinds if k not in ("prestart", "prestart_called_off")]
        assert "approval_pending" in kinds and "checkpoint" in kinds and ran[-1] == "phase_exit", kinds
    finally:
        for p in (run, follow):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.communicate()
