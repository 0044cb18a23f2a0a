"""Issue 16.5: `fleetmpi report` draws phase boundaries at the steps the rescales happened."""

from __future__ import annotations

import json
from pathlib import Path

from fleetmpi.jobdir import JobDir
from fleetmpi.jobs.report import series


def _job(tmp_path: Path, rescales: list[tuple[int, str]]) -> JobDir:
    """A job dir logged every 10 steps: phase small to step 20, wide to 40, single to 60."""
    jd = JobDir(tmp_path / "job")
    jd.root.mkdir(parents=True)
    phases = [(10, "small", 2), (20, "small", 2), (30, "wide", 3), (40, "wide", 3), (50, "single", 1), (60, "single", 1)]
    with open(jd.metrics, "w") as f:
        for step, phase, ranks in phases:
            f.write(json.dumps({"step": step, "phase": phase, "ranks": ranks, "loss": 1.0 / step,
                                "sync_bytes_per_step": 100.0}) + "\n")
    with open(jd.events, "w") as f:
        for step, to in rescales:
            f.write(json.dumps({"event": "rescale", "step": step, "from": "x", "to": to}) + "\n")
    return jd


def test_boundaries_are_the_rescale_steps_of_events_not_the_next_logged_step(tmp_path: Path) -> None:
    s = series(_job(tmp_path, [(20, "wide"), (40, "single")]))
    assert s["boundaries"] == [(20, "wide"), (40, "single")]   # drawn at 30 and 50 before


def test_a_rescale_repeated_after_a_retry_counts_once_and_no_events_falls_back_to_metrics(tmp_path: Path) -> None:
    s = series(_job(tmp_path, [(20, "wide"), (20, "wide"), (40, "single")]))
    assert s["boundaries"] == [(20, "wide"), (40, "single")]
    jd = _job(tmp_path / "bare", [])
    jd.events.unlink()
    assert series(jd)["boundaries"] == [(30, "wide"), (50, "single")]
