"""An MLP forecaster on lag windows under real mpiexec: a regression head, bitwise at 1, 2 and 3 ranks with sync exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from conftest import cli, events

from fleetmpi.h5store import read_h5_verified
from kernels import reference as ref

pytestmark = pytest.mark.slow

T, P, TAIL = 600, 2, 0.2
V = int(round(TAIL * T))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two series of a nonlinear (threshold) autoregression with random noise: a line cannot fit them."""
    rng = np.random.default_rng(21)
    s = np.zeros((T, 2))
    for c in range(2):
        for t in range(P, T):
            a, b = s[t - 1, c], s[t - 2, c]
            s[t, c] = (0.9 * a if a < 0 else -0.7 * a) + 0.2 * b + 0.3 * rng.standard_normal() + 0.4
    path = tmp_path_factory.mktemp("mlpw") / "series.h5"
    with h5py.File(path, "w") as f:
        f["series"] = s.astype(np.float32)
    return path


def _run(tmp: Path, name: str, data: Path, ranks: int, model: dict[str, Any], optimizer: dict[str, Any],
         sync: str = "exact") -> Path:
    spec = {"name": name, "seed": 3, "data": {"train": str(data), "valid_tail": TAIL, "windows": {"lags": P}},
            "model": model, "optimizer": optimizer, "sync": {"kind": sync}, "goal": {"max_steps": 150},
            "checkpoint": {"every_steps": 1000}, "monitor": {"eval_every_steps": 150},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}, "scheduler": {"oversubscribe": True}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = tmp / name
    proc = cli("run", str(path), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    return job


def _windows(s: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    X = np.concatenate([np.stack([s[t - P:t, c][::-1] for t in range(lo, hi)]) for c in range(s.shape[1])])
    return X, np.concatenate([s[lo:hi, c] for c in range(s.shape[1])])


def test_mlp_on_windows_forecasts_bitwise_at_1_2_3_ranks_and_beats_a_line(tmp_path: Path, series: Path) -> None:
    opt = {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "batch": 64}
    mlp = {"kind": "mlp", "hidden": [16], "l2": 1e-5}      # no task: windows give it the regression head
    jobs = [_run(tmp_path, f"mlp{r}", series, r, mlp, opt) for r in (1, 2, 3)]
    models = [read_h5_verified(j / "model.h5", kind="model") for j in jobs]
    params = [np.asarray(a["params"]) for a, _ in models]
    for p in params[1:]:
        np.testing.assert_array_equal(p, params[0])        # exact sync: the same model at any rank count
    meta = models[0][1]
    assert meta["task"] == "regression" and meta["sizes"] == [P, 16, 1]

    # The job's valid loss is the mean 0.5 (one-step error)^2 of the numpy reference's predictions on the tail.
    with h5py.File(series) as f:
        s = f["series"][...].astype(np.float64)
    Xv, yv = _windows(s, T - V, T)
    err = ref.mlp_regression_predict(Xv.astype(np.float32), params[0], (P, 16, 1)) - yv
    goal = [e for e in events(jobs[0]) if e["event"] == "goal"][0]
    np.testing.assert_allclose(goal["valid_loss"], np.mean(0.5 * err ** 2), rtol=1e-6)

    # Recursive forecasts after the end of every series: each step feeds the MLP its own predictions.
    out = tmp_path / "fc.h5"
    proc = cli("predict", str(jobs[1] / "model.h5"), str(series), "--horizon", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    want = np.empty((5, 2))
    for c in range(2):
        h = list(s[:, c])
        for k in range(5):
            h.append(float(ref.mlp_regression_predict(np.array([h[-1:-P - 1:-1]]), params[0], (P, 16, 1))[0]))
            want[k, c] = h[-1]
    np.testing.assert_allclose(read_h5_verified(out, kind="predictions")[0]["forecast"], want, rtol=1e-12)

    # A nonlinear series: the MLP's one-step error is below the best line's (the AR closed form).
    ar = _run(tmp_path, "ar", series, 1, {"kind": "ar", "lags": P}, {"kind": "closed_form"}, sync="dense")
    ar_goal = [e for e in events(ar) if e["event"] == "goal"][0]
    assert goal["valid_loss"] < 0.9 * ar_goal["valid_loss"], (goal["valid_loss"], ar_goal["valid_loss"])


def test_mlp_task_multiclass_on_windows_is_refused(tmp_path: Path, series: Path) -> None:
    spec = {"name": "bad", "data": {"train": str(series), "windows": {"lags": P}},
            "model": {"kind": "mlp", "hidden": [4], "task": "multiclass"}, "goal": {"max_steps": 1},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = cli("run", str(path), "--job-dir", str(tmp_path / "bad"))
    assert proc.returncode == 2
    assert "data.windows" in proc.stderr and "task multiclass" in proc.stderr and "Traceback" not in proc.stderr


def test_mlp_forecaster_on_a_gpu_phase_is_refused(tmp_path: Path, series: Path) -> None:
    # The GPU MLP kernels end in softmax: a regression MLP must not silently train as a classifier there.
    spec = {"name": "gpu", "data": {"train": str(series), "windows": {"lags": P}},
            "model": {"kind": "mlp", "hidden": [4]}, "goal": {"max_steps": 1},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1, "device": "gpu"}}}}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = cli("run", str(path), "--job-dir", str(tmp_path / "gpu"))
    assert proc.returncode == 2, proc.stderr
    assert "fleet.phases.p.device" in proc.stderr and "mlp (task regression)" in proc.stderr
