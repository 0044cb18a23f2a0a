"""Tree kinds end to end through the real `fleetmpi` command and real mpiexec.

gbdt (binary, multiclass) and a forest run at 1, 2 and 3 ranks, and a gbdt run rescaled
2 -> 3 -> 1 in the middle of its ensemble, must all write model.h5 arrays (cuts, feature,
bin, threshold, children, leaf values, gains) bitwise equal to the 1-rank run's. The
model then predicts: `fleetmpi predict` reproduces the run's own last validation accuracy
and loss, and `inspect` reports trees, depth, leaves and gain importance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, run_rescaled_and_solo, write_spec

ROUNDS = 8
COMMON: dict[str, Any] = {"optimizer": None, "goal": {"max_steps": ROUNDS}, "scheduler": {"oversubscribe": True},
                          "checkpoint": {"every_steps": 3, "keep": 5}, "monitor": {"log_every_steps": 1,
                                                                                    "eval_every_steps": 4}}
MODELS = {
    "gbdt-binary": ("binary", {"kind": "gbdt", "task": "binary", "trees": ROUNDS, "depth": 3, "bins": 31,
                               "row_sample": 0.8, "col_sample": 0.7}),
    "gbdt-multiclass": ("multiclass", {"kind": "gbdt", "task": "multiclass", "trees": ROUNDS, "depth": 3,
                                       "bins": 63, "learning_rate": 0.3}),
    "forest-binary": ("binary", {"kind": "forest", "task": "binary", "trees": ROUNDS, "depth": 4, "bins": 31}),
}
TREE_ARRAYS = ("cuts", "ncuts", "base", "round", "feature", "bin", "threshold", "left", "right", "value", "gain",
               "offsets", "tree_class")


def model_arrays(job: Path) -> dict[str, np.ndarray]:
    with h5py.File(job / "model.h5", "r") as f:
        return {name: f["arrays"][name][()] for name in TREE_ARRAYS}


def assert_same_trees(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), f"{name} differs: {what}"


def step_bytes(job: Path) -> dict[int, float]:
    return {m["step"]: m["sync_bytes_per_step"] for m in metrics(job) if not m.get("eval")}


@pytest.mark.parametrize("case", list(MODELS))
def test_same_model_at_every_rank_count(tmp_path: Path, datasets: dict[str, Path], case: str) -> None:
    task, model = MODELS[case]
    data = datasets[task]
    jobs = {}
    for ranks in (1, 2, 3):
        spec = write_spec(tmp_path / f"r{ranks}.yaml", data, model=model,
                          fleet={"start": "p", "phases": {"p": {"nodes": 1, "ranks_per_node": ranks}}}, **COMMON)
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / f"r{ranks}"))
        assert proc.returncode == 0, proc.stderr
        jobs[ranks] = tmp_path / f"r{ranks}"
    one = model_arrays(jobs[1])
    assert int(one["round"]) == ROUNDS
    assert one["offsets"].size - 1 == ROUNDS * (4 if task == "multiclass" else 1)
    assert (one["feature"] >= 0).sum() >= ROUNDS, "the trees should split"
    for ranks in (2, 3):
        assert_same_trees(model_arrays(jobs[ranks]), one, f"1 rank vs {ranks} ranks ({case})")
        # Each rank sums the whole histograms: the same bytes per step whatever the rank count.
        assert step_bytes(jobs[ranks]) == step_bytes(jobs[1])
    assert all(b > 0 for b in step_bytes(jobs[1]).values())

    # predict reproduces the run's own last evaluation (same trees, same rows).
    out = tmp_path / "pred.h5"
    res = cli("predict", str(jobs[1] / "model.h5"), str(data / "valid.h5"), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    last = [m for m in metrics(jobs[1]) if m.get("eval")][-1]
    with h5py.File(out, "r") as f, h5py.File(data / "valid.h5", "r") as v:
        pred, proba, y = f["arrays/pred"][()], f["arrays/proba"][()], v["y"][()]
    assert np.sum(pred == y) == round(last["valid_accuracy"] * y.size)
    p_true = np.where(y == 1, proba, 1.0 - proba) if task == "binary" else proba[np.arange(y.size), y.astype(int)]
    assert -np.log(p_true).mean() == pytest.approx(last["valid_loss"], rel=1e-9)


def test_rescaled_mid_ensemble_equals_solo(tmp_path: Path, datasets: dict[str, Path]) -> None:
    _, model = MODELS["gbdt-multiclass"]
    fleet = {"start": "two", "phases": {"two": {"nodes": 1, "ranks_per_node": 2},
                                        "three": {"nodes": 1, "ranks_per_node": 3},
                                        "one": {"nodes": 1, "ranks_per_node": 1}},
             "rules": [{"in": "two", "when": "step >= 3", "then": {"goto": "three"}},
                       {"in": "three", "when": "epoch >= 6", "then": {"goto": "one"}}]}
    common = {**COMMON, "monitor": {"log_every_steps": 1, "eval_every_steps": 1}}
    rescaled, solo = run_rescaled_and_solo(tmp_path, datasets["multiclass"], fleet, model=model, **common)
    ranks = [e["ranks"] for e in events(rescaled) if e["event"] == "phase_start"]
    assert ranks == [2, 3, 1], ranks
    assert_same_trees(model_arrays(rescaled), model_arrays(solo), "rescaled 2 -> 3 -> 1 vs 1 rank")
    assert step_bytes(rescaled) == step_bytes(solo)
    # Every checkpoint bins as the job dir's cuts do, and holds its round's trees.
    with h5py.File(rescaled / "cuts.h5", "r") as f:
        cuts = f["arrays/cuts"][()]
    for ck in sorted((rescaled / "ckpt").glob("step-*.h5")):
        with h5py.File(ck, "r") as f:
            assert np.array_equal(f["arrays/cuts"][()], cuts)
            assert int(f["arrays/round"][()]) == int(ck.stem.split("-")[1])

    info = json.loads(cli("inspect", str(rescaled / "model.h5"), "--json", check=True).stdout)
    tr = info["trees"]
    assert (tr["trees"], tr["rounds"]) == (4 * ROUNDS, ROUNDS) and 1 <= tr["depth"] <= 3
    assert tr["leaves"] == int((model_arrays(rescaled)["feature"] < 0).sum())
    shares = [e["share"] for e in tr["importance_gain"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-12
    text = cli("inspect", str(rescaled / "model.h5"), check=True).stdout
    assert f"trees: {4 * ROUNDS} ({ROUNDS} rounds), depth" in text and "importance" in text
