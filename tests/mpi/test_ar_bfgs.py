"""Full BFGS trains kind ar (issue 15.4): it reaches the closed-form optimum, at 1, 2 and 3 ranks."""

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

T, P = 300, 3


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two AR(3) series with random noise and a nonzero mean (so the intercept matters)."""
    rng = np.random.default_rng(44)
    s = np.zeros((T, 2))
    for c in range(2):
        for t in range(P, T):
            s[t, c] = 0.7 + np.array([0.45, -0.25, 0.2]) @ s[t - P:t, c][::-1] + rng.standard_normal()
    path = tmp_path_factory.mktemp("arbfgs") / "series.h5"
    with h5py.File(path, "w") as f:
        f["series"] = s.astype(np.float32)
    return path


def _run(tmp: Path, name: str, data: Path, ranks: int, optimizer: dict[str, Any], l2: float) -> Path:
    spec = {"name": name, "seed": 1, "data": {"train": str(data), "valid_tail": 0.1},
            "model": {"kind": "ar", "lags": P, "l2": l2}, "optimizer": optimizer, "goal": {"max_steps": 100},
            "checkpoint": {"every_steps": 1000}, "monitor": {"eval_every_steps": 100},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}, "scheduler": {"oversubscribe": True}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = cli("run", str(path), "--job-dir", str(tmp / name))
    assert proc.returncode == 0, proc.stderr
    return tmp / name


def _params(job: Path) -> np.ndarray:
    return np.asarray(read_h5_verified(job / "model.h5", kind="model")[0]["params"])


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_bfgs_reaches_the_closed_form_optimum(tmp_path: Path, series: Path, l2: float) -> None:
    solved = _params(_run(tmp_path, "cf", series, 1, {"kind": "closed_form"}, l2))
    bfgs_opt = {"kind": "bfgs", "lbfgs": {"batch": "full"}, "bfgs": {"tol_grad": 1e-10}}
    for ranks in (1, 2, 3):
        job = _run(tmp_path, f"bfgs{ranks}", series, ranks, bfgs_opt, l2)
        np.testing.assert_allclose(_params(job), solved, rtol=0, atol=1e-6)
        # The final training loss is the closed form's minimum of the same objective.
        assert [e["event"] for e in events(job)].count("goal") == 1
