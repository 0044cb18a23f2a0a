"""A user's CSV to CSV predictions under real mpiexec: make-data, run (2 -> 3 ranks and 1 rank), predict.

The model trained from the CSV carries make-data's preprocessing record; predict on the raw
CSV must apply its column order (the test shuffles the columns), standardisation, one-hot
layout and class names, and agree with a numpy reference on a pandas read of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, run_rescaled_and_solo

from fleetmpi.h5store import read_h5_verified
from kernels import reference as ref

pd = pytest.importorskip("pandas", reason="pandas reads the reference tables (pip install -e '.[dev]')")

CLASSES = ["heron", "ibis", "stork"]


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"wing": rng.normal(50, 9, n).round(4), "beak": rng.normal(12, 3, n).round(4),
                       "habitat": rng.choice(["marsh", "coast"], n), "weight": rng.normal(2.5, 0.7, n).round(4)})
    score = (df["wing"] - 50) / 9 + (df["beak"] - 12) / 3 + (df["habitat"] == "coast")
    df["bird"] = np.array(CLASSES)[np.digitize(score + rng.normal(0, 0.3, n), [-0.3, 0.9])]
    return df


@pytest.mark.slow
def test_csv_to_csv_predictions_rescaled_2_to_3_match_one_rank_bitwise(tmp_path: Path) -> None:
    _table(600, 1).to_csv(tmp_path / "birds.csv", index=False)
    proc = cli("make-data", "--from", "csv", str(tmp_path / "birds.csv"), "--label", "bird", "--categorical",
               "habitat", "--standardize", "--valid-fraction", "0.2", "--out", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    common = dict(model={"kind": "softmax", "l2": 1e-4}, sync={"kind": "exact"}, goal={"max_steps": 40},
                  optimizer={"kind": "sgd", "lr": 0.2, "momentum": 0.9, "batch": 48})
    fleet = {"start": "two", "phases": {"two": {"ranks_per_node": 2}, "three": {"ranks_per_node": 3}},
             "rules": [{"in": "two", "when": "step >= 20", "then": {"goto": "three"}}]}
    rescaled, solo = run_rescaled_and_solo(tmp_path, tmp_path / "data", fleet, **common)
    params, meta = read_h5_verified(rescaled / "model.h5", kind="model")
    assert np.array_equal(params["params"], read_h5_verified(solo / "model.h5", kind="model")[0]["params"])
    assert meta["preprocess"]["classes"] == CLASSES

    # New rows, columns in another order than at training: predict goes by name.
    new = _table(150, 2)
    new[["bird", "weight", "habitat", "beak", "wing"]].to_csv(tmp_path / "new.csv", index=False)
    outs = {}
    for job in (rescaled, solo):
        out = tmp_path / f"{job.name}.csv"
        proc = cli("predict", str(job / "model.h5"), str(tmp_path / "new.csv"), "--out", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        outs[job.name] = (json.loads(proc.stdout), out.read_text())
    assert outs["rescaled"][1] == outs["solo"][1]
    res, text = outs["rescaled"]

    rec = meta["preprocess"]
    X = np.column_stack([new[["wing", "beak"]].to_numpy(), new["habitat"].to_numpy()[:, None] == ["coast", "marsh"],
                         new["weight"].to_numpy()]).astype(np.float64)
    assert rec["features"] == ["wing", "beak", "habitat=coast", "habitat=marsh", "weight"]
    X = ((X - rec["mean"]) / rec["std"]).astype(np.float32)
    P = ref.softmax_predict_proba(X.astype(np.float64), params["params"], 3)
    got = pd.read_csv(tmp_path / "rescaled.csv")
    assert list(got.columns) == ["class", "p_heron", "p_ibis", "p_stork"]
    np.testing.assert_allclose(got[["p_heron", "p_ibis", "p_stork"]].to_numpy(), P, rtol=1e-6, atol=1e-7)
    assert list(got["class"]) == [CLASSES[i] for i in P.argmax(axis=1)]
    labels = new["bird"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    assert res["rows"] == 150 and res["accuracy"] == pytest.approx((P.argmax(axis=1) == labels).mean())
    assert res["log_loss"] == pytest.approx(-np.log(P[np.arange(150), labels]).mean(), rel=1e-5)
    assert res["accuracy"] > 0.6, "the model learned from the CSV"
    assert text.count("\n") == 151


def test_predict_table_bad_input_exits_2(tmp_path: Path, datasets: dict) -> None:
    """Refusals that need no trained model of mine: a missing column, NaN, unwritable --out."""
    _table(200, 3).to_csv(tmp_path / "birds.csv", index=False)
    assert cli("make-data", "--from", "csv", str(tmp_path / "birds.csv"), "--label", "bird", "--categorical",
               "habitat", "--out", str(tmp_path / "data")).returncode == 0
    # A tiny 1-rank job on the converted data (a few steps: only its model file is needed).
    from conftest import write_spec
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "data", goal={"max_steps": 3})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr
    model = str(tmp_path / "job" / "model.h5")
    new = _table(20, 4)
    new.drop(columns="beak").to_csv(tmp_path / "nobeak.csv", index=False)
    new.loc[5, "wing"] = np.nan
    new.to_csv(tmp_path / "nan.csv", index=False)
    for data, out, expect in (("nobeak.csv", "p.csv", ["nobeak.csv", "'beak'", "wing, beak"]),
                              ("nan.csv", "p.csv", ["nan.csv", "data row 6", "'wing'"]),
                              ("birds.csv", "/proc/p.csv", ["--out /proc/p.csv", "writable"])):
        proc = cli("predict", model, str(tmp_path / data), "--out", str(tmp_path / out))
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and all(e in proc.stderr for e in expect), proc.stderr
        assert not (tmp_path / "p.csv").exists()
