"""Issue 16.5/16.6: a rescaled run on a cold kernel cache says it compiles (once), and feeds
TensorBoard and MLflow; both are read back with the libraries' own readers."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import cli, write_spec

COMPILING = "fleetmpi: compiling kernels (first run only)"
# Both trackers are optional extras (`pip install -e '.[dev]'` brings them): their tests skip without them.
HAVE = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "mlflow")}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, datasets: dict) -> tuple[Path, str]:
    """One job, phase one (1 rank) -> two (2 ranks) at step 20, end at step 40, on a fresh numba cache."""
    tmp = tmp_path_factory.mktemp("tracked")
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 1},
                                        "two": {"nodes": 1, "ranks_per_node": 2}},
             "rules": [{"in": "one", "when": "step >= 20", "then": {"goto": "two"}}]}
    spec = write_spec(tmp / "tracked.yaml", datasets["multiclass"], name="tracked", fleet=fleet,
                      goal={"max_steps": 40}, checkpoint={"every_steps": 1000},
                      monitor={"log_every_steps": 5, "eval_every_steps": 10, "tensorboard": True, "mlflow": {}})
    jd = tmp / "job"
    proc = cli("run", str(spec), "--job-dir", str(jd), timeout=600,
               env={"NUMBA_CACHE_DIR": str(tmp / "numba-cache"), "FLEETMPI_PROGRESS": "lines"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return jd, proc.stderr


def test_a_cold_cache_is_announced_once_and_a_warm_one_not(tracked: tuple[Path, str]) -> None:
    jd, err = tracked
    assert err.count(COMPILING) == 1, err                 # phase one compiled; phase two found the cache
    assert err.index(COMPILING) < err.index("fleetmpi: phase one on 1 rank(s)"), err
    starts = [e for e in map(json.loads, (jd / "events.jsonl").read_text().splitlines()) if e["event"] == "phase_start"]
    assert [e["compiled_kernels"] for e in starts] == [True, False]
    if all(HAVE.values()):
        assert "warning" not in err, err   # trackers on and working: nothing to warn about
    else:
        assert "install it with `pip install 'fleetmpi[" in err, err   # one line per missing tracker


@pytest.mark.skipif(not HAVE["tensorboard"], reason="tensorboard is not installed (pip install 'fleetmpi[tensorboard]')")
def test_tensorboard_reads_scalars_of_both_phases_and_the_rescale(tracked: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    jd, _ = tracked
    run = jd / "tensorboard" / "tracked"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2   # one file per phase (process), one run
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e.value for e in acc.Scalars("ranks")] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [e.step for e in acc.Scalars("valid_loss")] == [10, 20, 30, 40]
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("fleet")]
    assert texts[0] == "phase one on 1 rank(s) from step 0", texts
    assert "one x1 -> two x2 at step 20" in texts and "phase two on 2 rank(s) from step 20" in texts, texts
    assert texts[-1].startswith("budget spent: budget spent (max_steps 40)"), texts


@pytest.mark.skipif(not HAVE["mlflow"], reason="mlflow is not installed (pip install 'fleetmpi[mlflow]')")
@pytest.mark.filterwarnings("ignore::FutureWarning")      # mlflow: "the filesystem tracking backend ..." notice
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mlflow's and its dependencies' own deprecations
def test_mlflow_has_one_run_with_params_phase_and_rescale_tags_metrics_and_the_model(
        tracked: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 reads its file store only when asked
    from mlflow.tracking import MlflowClient
    jd, _ = tracked
    state = json.loads((jd / "state.json").read_text())
    client = MlflowClient(tracking_uri=(jd / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]   # later phases logged to the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["optimizer.lr"] == "0.2" and p["model.kind"] == "softmax" and p["goal.max_steps"] == "40"
    tags = run.data.tags
    assert tags["phase.0"] == "phase one on 1 rank(s) from step 0"
    assert tags["phase.1"] == "phase two on 2 rank(s) from step 20"
    assert tags["rescale.0"] == "one x1 -> two x2 at step 20"
    assert tags["fleetmpi.outcome"] == "budget spent"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.h5"]
    got = client.download_artifacts(run.info.run_id, "model.h5", str(tmp_path))
    assert os.path.getsize(got) == (jd / "model.h5").stat().st_size
