"""The gp technique through `fleetmpi run` under real mpiexec: the same model bit for bit at
1, 2 and 3 ranks and across a rescale, `fleetmpi predict` writing mean and std, and bad gp
keys exiting 2 with one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, write_spec

from fleetmpi.h5store import read_h5_verified

GP = {"model": {"kind": "gp", "features": 48, "kernel": "matern52", "ard": True},
      "goal": {"max_steps": 40}, "monitor": {"log_every_steps": 1, "eval_every_steps": 2},
      "checkpoint": {"every_steps": 4, "keep": 2}}


@pytest.fixture(scope="module")
def gpdata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Regression data of 4 global chunks of rows (3 ranks split them unevenly)."""
    out = tmp_path_factory.mktemp("gpdata")
    cli("make-data", "--task", "regression", "--n", "4500", "--d", "5", "--seed", "4", "--out", str(out), check=True)
    return out


def run_gp(tmp_path: Path, data: Path, name: str, ranks: int) -> Path:
    spec = write_spec(tmp_path / f"{name}.yaml", data, **GP,
                      fleet={"start": "p", "phases": {"p": {"ranks_per_node": ranks}}},
                      scheduler={"oversubscribe": True})
    _drop_optimizer(spec)
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    return tmp_path / name


def _drop_optimizer(spec: Path) -> None:
    import yaml
    raw = yaml.safe_load(spec.read_text())
    raw.pop("optimizer", None)
    spec.write_text(yaml.safe_dump(raw))


def model_arrays(job: Path) -> dict[str, np.ndarray]:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return arrays


def test_gp_model_is_bitwise_the_same_at_1_2_3_ranks_and_predicts(tmp_path: Path, gpdata: Path) -> None:
    jobs = [run_gp(tmp_path, gpdata, f"r{n}", n) for n in (1, 2, 3)]
    ref = model_arrays(jobs[0])
    for job in jobs[1:]:
        got = model_arrays(job)
        for name in ("theta", "mean_w", "chol", "omega", "b"):
            assert got[name].tobytes() == ref[name].tobytes(), (job.name, name)
    goal = [e for e in events(jobs[0]) if e["event"] == "goal"][0]
    assert goal["outcome"] == "solved"           # L-BFGS converged before the step budget
    last = [m for m in metrics(jobs[0]) if m.get("eval")][-1]
    assert {"valid_loss", "valid_mse", "valid_nlpd"} <= set(last)

    out = tmp_path / "pred.h5"
    proc = cli("predict", str(jobs[2] / "model.h5"), str(gpdata / "valid.h5"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] > 0
    pred, _ = read_h5_verified(out, kind="predictions")
    with h5py.File(gpdata / "valid.h5") as f:
        X, y = f["X"][:].astype(np.float64), f["y"][:].astype(np.float64)
    # Reference: the predictive distribution from the model file's arrays by plain numpy.
    _, meta = read_h5_verified(jobs[2] / "model.h5", kind="model")
    ls, s, e = np.exp(ref["theta"][:-2]), math.exp(ref["theta"][-2]), math.exp(ref["theta"][-1])
    D = ref["omega"].shape[0]
    Phi = math.sqrt(2 * s / D) * np.cos((X / ls) @ ref["omega"].T + ref["b"])
    A = ref["chol"] @ ref["chol"].T
    mean = meta["y_mean"] + meta["y_std"] * (Phi @ ref["mean_w"])
    std = meta["y_std"] * np.sqrt(np.einsum("ij,ij->i", Phi, np.linalg.solve(A, Phi.T).T) + e)
    np.testing.assert_allclose(pred["mean"], mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pred["std"], std, rtol=1e-8)
    np.testing.assert_array_equal(pred["pred"], pred["mean"])
    mse = float(((pred["mean"] - y) ** 2).mean())
    assert mse == pytest.approx(last["valid_mse"], rel=1e-9)
    assert mse < 0.5 * float(y.var())              # it learned the signal
    nlpd = float((0.5 * np.log(2 * np.pi * std**2) + 0.5 * ((y - mean) / std) ** 2).mean())
    assert nlpd == pytest.approx(last["valid_nlpd"], rel=1e-9)


def test_gp_rescaled_mid_fit_matches_solo_bit_for_bit(tmp_path: Path, gpdata: Path) -> None:
    fleet = {"start": "two", "phases": {"two": {"ranks_per_node": 2}, "three": {"ranks_per_node": 3}},
             "rules": [{"in": "two", "when": "step >= 4", "then": {"goto": "three"}}]}
    sections = {**GP, "scheduler": {"oversubscribe": True}}
    # conftest's run_rescaled_and_solo writes an optimizer section, which gp refuses: the same, here.
    jobs = []
    for name, fl in (("rescaled", fleet), ("solo", {"start": "s", "phases": {"s": {"ranks_per_node": 1}}})):
        spec = write_spec(tmp_path / f"{name}.yaml", gpdata, fleet=fl, **sections)
        _drop_optimizer(spec)
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        jobs.append(tmp_path / name)
    assert any(e["event"] == "rescale" for e in events(jobs[0]))
    a, b = model_arrays(jobs[0]), model_arrays(jobs[1])
    for name in ("theta", "mean_w", "chol"):
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize(("model", "key"), [
    ({"kind": "gp", "features": 0}, "model.features"),
    ({"kind": "gp", "noise": -0.5}, "model.noise"),
])
def test_bad_gp_key_exits_2_with_one_line(tmp_path: Path, gpdata: Path, model: dict[str, Any], key: str) -> None:
    spec = write_spec(tmp_path / "bad.yaml", gpdata, model=model)
    _drop_optimizer(spec)
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "bad"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr
