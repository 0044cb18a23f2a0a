"""Kind ar beyond closed_form (issue 15.4): full BFGS reaches the closed-form optimum; a rule switches to closed_form."""

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


def _run(tmp: Path, name: str, data: Path, ranks: int, optimizer: dict[str, Any], l2: float,
         rules: list[dict[str, Any]] | None = None, eval_every: int = 100) -> Path:
    spec = {"name": name, "seed": 1, "data": {"train": str(data), "valid_tail": 0.1},
            "model": {"kind": "ar", "lags": P, "l2": l2}, "optimizer": optimizer, "goal": {"max_steps": 100},
            "checkpoint": {"every_steps": 1000}, "monitor": {"eval_every_steps": eval_every},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}, "rules": rules or []},
            "scheduler": {"oversubscribe": True}}
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


def test_a_rule_switches_sgd_to_closed_form_which_solves_and_ends(tmp_path: Path, series: Path) -> None:
    solved = _params(_run(tmp_path, "cf", series, 1, {"kind": "closed_form"}, 0.01))
    rule = {"when": "step >= 4", "then": {"optimizer": "closed_form"}}
    for ranks in (2, 3):
        job = _run(tmp_path, f"sw{ranks}", series, ranks, {"kind": "sgd", "lr": 0.01, "batch": 32}, 0.01,
                   rules=[rule], eval_every=2)
        np.testing.assert_array_equal(_params(job), solved)   # the exact sums: the same bits as solving at once
        ev = events(job)
        switch = [e for e in ev if e["event"] == "optimizer_switch"]
        assert len(switch) == 1 and switch[0]["from"] == "sgd" and switch[0]["to"] == "closed_form"
        goal = [e for e in ev if e["event"] == "goal"]
        assert len(goal) == 1 and goal[0]["outcome"] == "solved" and goal[0]["step"] < 100


def test_closed_form_rule_on_another_kind_exits_2(tmp_path: Path, series: Path) -> None:
    spec = {"name": "bad", "data": {"train": str(series), "windows": {"lags": P}}, "model": {"kind": "linear"},
            "goal": {"max_steps": 5}, "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1}},
                                                  "rules": [{"when": "step >= 2", "then": {"optimizer": "closed_form"}}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = cli("run", str(path), "--job-dir", str(tmp_path / "bad"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fleet.rules[0].then.optimizer" in lines[0] and "kind ar" in lines[0], proc.stderr
