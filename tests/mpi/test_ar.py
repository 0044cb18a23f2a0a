"""Autoregression on lag windows under real mpiexec: closed form at 1, 2 and 3 ranks, gradient fits, forecasts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from conftest import cli, events

from fleetmpi.h5store import read_h5_verified

pytestmark = pytest.mark.slow

T, P, TAIL = 400, 3, 0.2
V = int(round(TAIL * T))
PHI = np.array([0.5, -0.3, 0.15])


def _ar_series(rng: np.random.Generator, n: int) -> np.ndarray:
    y = np.zeros(n)
    for t in range(P, n):
        y[t] = 0.4 + PHI @ y[t - P:t][::-1] + rng.standard_normal()
    return y


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two AR(3) series with random noise, written as series.h5 by the real make-data from a CSV."""
    root = tmp_path_factory.mktemp("series")
    rng = np.random.default_rng(15)
    cols = np.stack([_ar_series(rng, T), _ar_series(rng, T)], axis=1)
    lines = ["when,a,b,note"] + [f"t{t},{float(cols[t, 0])!r},{float(cols[t, 1])!r},x" for t in range(T)]
    (root / "s.csv").write_text("\n".join(lines) + "\n")
    cli("make-data", "--from", "csv", str(root / "s.csv"), "--series-columns", "a,b", "--out", str(root / "two"),
        check=True)
    cli("make-data", "--from", "csv", str(root / "s.csv"), "--series-columns", "a", "--out", str(root / "one"),
        check=True)
    with h5py.File(root / "two" / "series.h5") as f:
        two = f["series"][...]
    assert two.dtype == np.float32 and two.shape == (T, 2)
    np.testing.assert_array_equal(two, cols.astype(np.float32))
    return {"root": root, "two": root / "two" / "series.h5", "one": root / "one" / "series.h5", "values": two}


def _windows(s: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (X, y) of targets t in [lo, hi) of every column, lag 1 first: the numpy reference."""
    s = s.reshape(len(s), -1).astype(np.float64)
    X = np.concatenate([np.stack([s[t - P:t, c][::-1] for t in range(lo, hi)]) for c in range(s.shape[1])])
    y = np.concatenate([s[lo:hi, c] for c in range(s.shape[1])])
    return X, y


def _run(tmp: Path, name: str, data: Path, ranks: int, optimizer: dict[str, Any], **model: Any) -> Path:
    spec = {"name": name, "seed": 2, "data": {"train": str(data), "valid_tail": TAIL},
            "model": {"kind": "ar", "lags": P, **model}, "optimizer": optimizer, "goal": {"max_steps": 200},
            "checkpoint": {"every_steps": 1000, "keep_best": False},   # final parameters vs lstsq
            "monitor": {"eval_every_steps": 50},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}, "scheduler": {"oversubscribe": True}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = tmp / name
    proc = cli("run", str(path), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    return job


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return np.asarray(arrays["params"])


@pytest.fixture(scope="module")
def closed_form_jobs(tmp_path_factory: pytest.TempPathFactory, series: dict[str, Any]) -> list[Path]:
    """The closed form on both series at 1, 2 and 3 ranks: the bitwise test's jobs and the forecast's model."""
    tmp = tmp_path_factory.mktemp("cf")
    return [_run(tmp, f"cf{r}", series["two"], r, {"kind": "closed_form"}) for r in (1, 2, 3)]


def test_closed_form_is_bitwise_equal_at_1_2_3_ranks_and_matches_least_squares(
        series: dict[str, Any], closed_form_jobs: list[Path]) -> None:
    jobs = closed_form_jobs
    params = [_params(j) for j in jobs]
    for p in params[1:]:
        np.testing.assert_array_equal(p, params[0])       # one long series split at any window: same sums
    X, y = _windows(series["values"], P, T - V)           # training targets end before the tail
    A = np.hstack([X, np.ones((len(y), 1))])
    ref = np.linalg.lstsq(A, y, rcond=None)[0]
    np.testing.assert_allclose(params[0], ref, rtol=0, atol=1e-8)
    for job in jobs:
        goal = [e for e in events(job) if e["event"] == "goal"]
        assert len(goal) == 1 and goal[0]["outcome"] == "solved" and goal[0]["step"] == 1
        # valid loss: mean 0.5 (one-step-ahead error)^2 over the tail, inputs the true values before each point
        Xv, yv = _windows(series["values"], T - V, T)
        err = np.hstack([Xv, np.ones((len(yv), 1))]) @ params[0] - yv
        np.testing.assert_allclose(goal[0]["valid_loss"], np.mean(0.5 * err ** 2), rtol=1e-6)


def test_closed_form_matches_statsmodels_autoreg(tmp_path: Path, series: dict[str, Any]) -> None:
    ar_model = pytest.importorskip("statsmodels.tsa.ar_model", reason="statsmodels is not installed")
    job = _run(tmp_path, "sm", series["one"], 2, {"kind": "closed_form"})
    train = series["values"][:T - V, 0].astype(np.float64)
    fit = ar_model.AutoReg(train, lags=P, trend="c").fit()
    const, lags = fit.params[0], fit.params[1:]
    np.testing.assert_allclose(_params(job), [*lags, const], rtol=0, atol=1e-8)


def test_trend_none_and_gradient_techniques_train_ar(tmp_path: Path, series: dict[str, Any]) -> None:
    X, y = _windows(series["values"], P, T - V)
    none = _params(_run(tmp_path, "none", series["two"], 2, {"kind": "closed_form"}, trend="none"))
    assert none[P] == 0.0
    np.testing.assert_allclose(none[:P], np.linalg.lstsq(X, y, rcond=None)[0], rtol=0, atol=1e-8)
    ref = np.linalg.lstsq(np.hstack([X, np.ones((len(y), 1))]), y, rcond=None)[0]
    lbfgs = _params(_run(tmp_path, "lbfgs", series["two"], 3, {"kind": "lbfgs"}))
    np.testing.assert_allclose(lbfgs, ref, atol=1e-4)
    sgd = _params(_run(tmp_path, "sgd", series["two"], 2, {"kind": "sgd", "lr": 0.05, "batch": 64}))
    np.testing.assert_allclose(sgd, ref, atol=0.1)         # a noisy fit, but of the same model


def test_predict_horizon_writes_recursive_forecasts(tmp_path: Path, series: dict[str, Any],
                                                    closed_form_jobs: list[Path]) -> None:
    job = closed_form_jobs[0]   # 1 rank
    w = _params(job)
    out = tmp_path / "fc.h5"
    proc = cli("predict", str(job / "model.h5"), str(series["two"]), "--horizon", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    arrays, _ = read_h5_verified(out, kind="predictions")
    hist = series["values"].astype(np.float64)
    want = np.empty((6, 2))
    for c in range(2):
        h = list(hist[:, c])
        for k in range(6):
            h.append(float(w[:P] @ np.array(h[-1:-P - 1:-1]) + w[P]))
            want[k, c] = h[-1]
    np.testing.assert_allclose(arrays["forecast"], want, rtol=1e-12)
