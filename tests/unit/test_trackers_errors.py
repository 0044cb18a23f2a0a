"""Issue 16.6: a tracker that fails never fails training: one warning line, then it is off."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import write_spec

from fleetmpi.engine.trackers import Trackers, flat_params
from fleetmpi.jobdir import JobDir
from fleetmpi.spec import load


def _spec(tmp_path: Path, monitor: dict) -> tuple[JobDir, object]:
    spec = load(write_spec(tmp_path / "s.yaml", tmp_path / "data", monitor=monitor))
    jd = JobDir(tmp_path / "job")
    jd.root.mkdir()
    jd.state_path.write_text(json.dumps({"phases_run": []}))
    return jd, spec


def test_flat_params_name_every_spec_value_by_its_path(tmp_path: Path) -> None:
    _, spec = _spec(tmp_path, {"mlflow": {"experiment": "e"}})
    p = flat_params(spec)  # type: ignore[arg-type]
    assert p["optimizer.lr"] == "0.2" and p["fleet.phases.one.ranks_per_node"] == "1"
    assert p["monitor.mlflow.experiment"] == "e" and not any(k.startswith("_") for k in p)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_a_tracker_that_fails_is_one_warning_line_and_training_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    jd, spec = _spec(tmp_path, {"mlflow": {"tracking_uri": (blocker / "mlruns").as_uri()}})
    said: list[str] = []
    tr = Trackers(jd, spec, phase="one", ranks=1, step=0, say=said.append)  # type: ignore[arg-type]
    for step in range(1, 4):
        tr.scalars(step, {"step": step, "loss": 0.5})
    tr.finish({"outcome": "budget spent"}, None)
    tr.close(wait_s=120)
    assert len(said) == 1 and said[0].startswith("fleetmpi: warning: mlflow tracking off: "), said
    assert tr.take_state() == {}


def test_no_tracker_asked_for_means_no_thread_and_no_state_read(tmp_path: Path) -> None:
    jd, spec = _spec(tmp_path, {})
    jd.state_path.unlink()   # not even read
    tr = Trackers(jd, spec, phase="one", ranks=1, step=0, say=print)  # type: ignore[arg-type]
    assert not tr.enabled
    tr.scalars(1, {"loss": 1.0})
    tr.close()
