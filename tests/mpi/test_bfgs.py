"""Full BFGS end to end: scikit-learn's optimum, bitwise across rank counts, curvature across a rescale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, run_rescaled_and_solo, write_spec

from fleetmpi.engine import checkpoint
from fleetmpi.h5store import read_h5_verified

C = 0.5          # scikit-learn's inverse penalty; fleetmpi's l2 is per row: 1 / (C n)
STEPS = 120    # C = 0.5 on correlated features: ~100 iterations to 1e-9
EXACT = {"kind": "exact"}


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a make-data folder of scikit-learn's breast_cancer set, standardised (train + valid)."""
    out = tmp_path_factory.mktemp("cancer")
    cli("make-data", "--from", "breast_cancer", "--valid-fraction", "0.2", "--seed", "4", "--out", str(out),
        check=True)
    return out


def _train(data: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(data / "train.h5") as f:
        return f["X"][...].astype(np.float64), f["y"][...].astype(np.float64)


def _common(data: Path, **extra: Any) -> dict[str, Any]:
    n = len(_train(data)[1])
    return dict(model={"kind": "logistic", "l2": 1.0 / (C * n)}, sync=EXACT,
                optimizer={"kind": "bfgs", "bfgs": {"tol_grad": 1e-9}},
                # keep_best off: these runs test where the optimizer ends, not the best-valid model
                goal={"max_steps": STEPS}, checkpoint={"every_steps": 20, "keep": 10, "keep_best": False}, **extra)


def _run(tmp_path: Path, data: Path, name: str, ranks: int, **sections: Any) -> Path:
    fleet = {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}
    spec = write_spec(tmp_path / f"{name}.yaml", data, **{"fleet": fleet, **sections})
    job = tmp_path / name
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    return job


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return arrays["params"]


def _by_step(job: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(job) if not m.get("eval")}


def _objective(X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> float:
    z = X @ w[:-1] + w[-1]
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w[:-1] @ w[:-1])


@pytest.fixture(scope="module")
def solo(cancer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the job dir of BFGS on one rank (exact sync)."""
    return _run(tmp_path_factory.mktemp("solo"), cancer, "solo", 1, **_common(cancer))


def test_bfgs_reaches_scikit_learns_logistic_optimum(cancer: Path, solo: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    X, y = _train(cancer)
    sk = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)
    want = np.concatenate([sk.coef_[0], sk.intercept_])
    w = _params(solo)
    l2 = 1.0 / (C * len(y))
    f_ours, f_sk = _objective(X, y, w, l2), _objective(X, y, want, l2)
    assert abs(f_ours - f_sk) <= 1e-6 * f_sk, (f_ours, f_sk)
    np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    rows = _by_step(solo)
    losses = [rows[s]["loss"] for s in range(1, STEPS + 1)]
    assert all(b <= a for a, b in zip(losses, losses[1:]))         # a line search never goes up
    assert abs(losses[-1] - f_ours) <= 1e-9 * f_ours
    assert {rows[s]["optimizer"] for s in rows} == {"bfgs"}


@pytest.mark.parametrize("ranks", [2, 3])
def test_bfgs_with_exact_sync_is_bitwise_equal_at_any_rank_count(tmp_path: Path, cancer: Path, solo: Path,
                                                                  ranks: int) -> None:
    job = _run(tmp_path, cancer, f"r{ranks}", ranks, **_common(cancer))
    np.testing.assert_array_equal(_params(job), _params(solo))
    _same_iterations(_by_step(job), _by_step(solo))


def _same_iterations(a: dict[int, dict], b: dict[int, dict], steps: range = range(1, STEPS + 1)) -> None:
    """Assert the runs took the same step lengths and evaluations; losses equal to rounding."""
    for s in steps:
        assert (a[s]["lr"], a[s]["epoch"]) == (b[s]["lr"], b[s]["epoch"]), s   # epoch counts evaluations
        # Exact sync sums the gradient exactly but the reported loss as floats in rank order.
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-13 * b[s]["loss"], (s, a[s]["loss"], b[s]["loss"])


def test_rescale_2_to_3_keeps_the_curvature(tmp_path: Path, cancer: Path) -> None:
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": 2}, "b": {"ranks_per_node": 3}},
             "rules": [{"in": "a", "when": "step >= 10", "then": {"goto": "b"}}]}
    rescaled, single = run_rescaled_and_solo(tmp_path, cancer, fleet, **_common(cancer))
    starts = [(e["phase"], e["ranks"], e["step"]) for e in events(rescaled) if e["event"] == "phase_start"]
    assert starts == [("a", 2, 0), ("b", 3, 10)]
    ck = checkpoint.load(checkpoint.checkpoint_path(rescaled / "ckpt", 10))
    n_params = len(_params(single))
    assert ck.arrays["bfgs_H"].shape == (n_params, n_params) and ck.arrays["bfgs_H"].any()
    # Every iteration after the rescale is the one the uninterrupted run took: had the new
    # ranks started from H = 0, step 11 would be a steepest-descent step instead.
    _same_iterations(_by_step(rescaled), _by_step(single))
    np.testing.assert_array_equal(_params(rescaled), _params(single))


def test_rule_switches_sgd_to_bfgs_and_reaches_the_optimum(tmp_path: Path, cancer: Path, solo: Path) -> None:
    common = _common(cancer)
    common["optimizer"] = {"kind": "sgd", "lr": 0.1, "batch": 50, "bfgs": {"tol_grad": 1e-9}}
    fleet = {"start": "p", "phases": {"p": {"ranks_per_node": 2}},
             "rules": [{"when": "step >= 10", "then": {"optimizer": "bfgs"}}]}
    spec = write_spec(tmp_path / "s.yaml", cancer, fleet=fleet, **common)
    job = tmp_path / "job"
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    switch = [e for e in events(job) if e["event"] == "optimizer_switch"]
    assert [(e["from"], e["to"], e["step"]) for e in switch] == [("sgd", "bfgs", 10)]
    rows = _by_step(job)
    # The budget, or sooner where BFGS converges (its gradient within tol_grad: solved).
    goal = next(e for e in events(job) if e["event"] == "goal")
    last = goal["step"]
    assert last == max(rows) and (last == STEPS or (goal["outcome"] == "solved" and last > 40)), goal
    assert all(rows[s]["optimizer"] == "sgd" for s in range(1, 11))
    assert all(rows[s]["optimizer"] == "bfgs" for s in range(11, last + 1))
    bf = [rows[s]["loss"] for s in range(12, last + 1)]
    assert all(b <= a for a, b in zip(bf, bf[1:]))
    X, y = _train(cancer)
    l2 = 1.0 / (C * len(y))
    f, f_solo = _objective(X, y, _params(job), l2), _objective(X, y, _params(solo), l2)
    assert abs(f - f_solo) <= 1e-6 * f_solo, (f, f_solo)
    assert checkpoint.load(checkpoint.checkpoint_path(job / "ckpt", 40)).arrays["bfgs_H"].any()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a binary set with 5000 features: a logistic model of 5001 parameters (H: 200.1 MB)."""
    out = tmp_path_factory.mktemp("wide")
    cli("make-data", "--task", "binary", "--n", "40", "--d", "5000", "--seed", "2", "--out", str(out), check=True)
    return out


@pytest.mark.parametrize("where", ["optimizer.kind", "fleet.rules[0].then.optimizer"])
def test_bfgs_over_the_size_limit_exits_2_with_one_line(tmp_path: Path, wide: Path, where: str) -> None:
    fleet: dict[str, Any] = {"start": "p", "phases": {"p": {"ranks_per_node": 1}}}
    optimizer = {"kind": "bfgs"}
    if where != "optimizer.kind":
        optimizer = {"kind": "sgd", "batch": 10}
        fleet["rules"] = [{"when": "step >= 5", "then": {"optimizer": "bfgs"}}]
    spec = write_spec(tmp_path / "s.yaml", wide, model={"kind": "logistic"}, optimizer=optimizer, fleet=fleet)
    job = tmp_path / "job"
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].endswith(f"{where}: bfgs keeps a d x d matrix: 5001 parameters need 200.1 MB "
                             "(limit 200 MB); use optimizer lbfgs"), lines[0]
    assert not job.exists()


@pytest.mark.parametrize("kind", ["lbfgs", "bfgs"])
def test_a_converged_quasi_newton_fit_ends_as_solved(tmp_path: Path, kind: str) -> None:
    """Past tol_grad a step evaluates nothing, so no epoch passes: the run must end there, not spin.

    192 training rows, fewer than optimizer.batch's default 256, which these optimizers do not read.
    """
    data = tmp_path / "d"
    cli("make-data", "--task", "binary", "--n", "240", "--d", "5", "--seed", "2", "--out", str(data), check=True)
    spec = write_spec(tmp_path / "s.yaml", data, model={"kind": "logistic", "l2": 1e-3},
                      optimizer={"kind": kind}, goal={"max_epochs": 1000},
                      fleet={"start": "p", "phases": {"p": {"ranks_per_node": 2}}})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    goal = next(e for e in events(tmp_path / "job") if e["event"] == "goal")
    assert goal["outcome"] == "solved" and goal["step"] < 200, goal
    assert len(metrics(tmp_path / "job")) <= goal["step"] + 5
