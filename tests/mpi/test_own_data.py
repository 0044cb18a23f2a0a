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
    (tmp_path / "quote.csv").write_text('wing,beak,habitat,weight\n50,12,"marsh,2.5\n51,11,coast,2.4\n')
    for data, out, expect in (("nobeak.csv", "p.csv", ["nobeak.csv", "'beak'", "wing, beak"]),
                              ("nan.csv", "p.csv", ["nan.csv", "data row 6", "'wing'", "make-data --fill mean"]),
                              ("quote.csv", "p.csv", ["quote.csv", "data row 1", "not readable as CSV"]),
                              ("birds.csv", "/proc/p.csv", ["--out /proc/p.csv", "writable"])):
        proc = cli("predict", model, str(tmp_path / data), "--out", str(tmp_path / out))
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and all(e in proc.stderr for e in expect), proc.stderr
        assert not (tmp_path / "p.csv").exists()

    assert "pass --fill mean" not in cli("predict", model, str(tmp_path / "nan.csv"), "--out", str(tmp_path / "p.csv")).stderr
    # Rows without a label are predicted, and scored only where labelled.
    new = _table(30, 5)
    new["bird"] = new["bird"].astype(object)
    new.loc[[2, 11, 17], "bird"] = None
    new.to_csv(tmp_path / "some.csv", index=False)
    proc = cli("predict", model, str(tmp_path / "some.csv"), "--out", str(tmp_path / "p.csv"), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    pred = pd.read_csv(tmp_path / "p.csv")["class"].to_numpy()
    known = new["bird"].notna().to_numpy()
    assert res["rows"] == 30 and res["labelled_rows"] == 27 and len(pred) == 30
    assert res["accuracy"] == pytest.approx(float(np.mean(pred[known] == new["bird"].to_numpy()[known])))


def test_gp_predicts_tables_and_npy_columns_go_by_position(tmp_path: Path) -> None:
    """A gp (150 rows: fewer than the default batch it does not use) predicts an .npy as it does the HDF5."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(150, 3))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", np.sin(X @ [1.0, -0.5, 0.25]) + 0.05 * rng.normal(size=150))
    np.save(tmp_path / "X4.npy", np.hstack([np.arange(150.0)[:, None], X]))
    assert cli("make-data", "--from", "npy", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"),
               "--out", str(tmp_path / "d")).returncode == 0
    spec = tmp_path / "gp.yaml"
    spec.write_text(json.dumps({"name": "gp", "seed": 0, "model": {"kind": "gp", "features": 64},
                                "data": {"train": str(tmp_path / "d" / "train.h5")}, "goal": {"max_steps": 4},
                                "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 2}}}}))
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr
    model = str(tmp_path / "job" / "model.h5")
    import h5py
    with h5py.File(tmp_path / "X.h5", "w") as f:
        f["X"] = X.astype(np.float32)
    for data, out in (("X.npy", "a.h5"), ("X.h5", "b.h5")):
        proc = cli("predict", model, str(tmp_path / data), "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stderr
    a, b = (read_h5_verified(tmp_path / out, kind="predictions")[0] for out in ("a.h5", "b.h5"))
    for name in ("mean", "std", "pred"):
        assert a[name].shape == (150,) and np.array_equal(a[name], b[name]), name
    assert np.all(a["std"] > 0)
    for data, out, expect in (("X4.npy", "c.h5", ["X4.npy", "4 columns", "takes 3", "by position"]),
                              ("X.npy", "c.csv", ["--out", "c.csv", "HDF5"])):
        proc = cli("predict", model, str(tmp_path / data), "--out", str(tmp_path / out))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert all(e in proc.stderr for e in expect), proc.stderr
        assert not (tmp_path / out).exists()


def test_libsvm_predict_refuses_indices_the_model_lacks(tmp_path: Path) -> None:
    """A boosted model on 120 LIBSVM rows (no optimizer, so no batch to fit); predict checks each index."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 4))
    lines = [f"{'+1' if x[0] - x[2] > 0 else '-1'} " + " ".join(f"{j + 1}:{x[j]:.5f}" for j in range(4)) for x in X]
    (tmp_path / "t.svm").write_text("\n".join(lines) + "\n")
    assert cli("make-data", "--from", "libsvm", str(tmp_path / "t.svm"), "--valid-fraction", "0",
               "--out", str(tmp_path / "d")).returncode == 0
    spec = tmp_path / "gb.yaml"
    spec.write_text(json.dumps({"name": "gb", "seed": 0, "model": {"kind": "gbdt", "trees": 4, "depth": 2},
                                "data": {"train": str(tmp_path / "d" / "train.h5")}, "goal": {"max_steps": 4},
                                "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1}}}}))
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr
    model = str(tmp_path / "job" / "model.h5")
    (tmp_path / "ok.svm").write_text("+1 1:0.5 4:-1\n")
    assert cli("predict", model, str(tmp_path / "ok.svm"), "--out", str(tmp_path / "ok.csv")).returncode == 0
    for row, expect in (("+1 1:0.5 9:1", ["line 1", "feature index 9", "0..4"]),
                        ("+1 -1:0.5", ["line 1", "feature index -1", "0..4"]),
                        ("1:0.5 2:1", ["line 1", "not a label"])):
        (tmp_path / "p.svm").write_text(row + "\n")
        proc = cli("predict", model, str(tmp_path / "p.svm"), "--out", str(tmp_path / "p.csv"))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "p.svm" in proc.stderr and all(e in proc.stderr for e in expect), proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "p.csv").exists()


def test_run_refuses_train_and_valid_made_apart(tmp_path: Path) -> None:
    """Two make-data runs standardise (and number classes) apart: the pair would not mean the same."""
    _table(200, 6).to_csv(tmp_path / "a.csv", index=False)
    _table(90, 7).to_csv(tmp_path / "b.csv", index=False)
    for name in ("a", "b"):
        assert cli("make-data", "--from", "csv", str(tmp_path / f"{name}.csv"), "--label", "bird", "--categorical",
                   "habitat", "--standardize", "--valid-fraction", "0", "--out", str(tmp_path / name)).returncode == 0
    import shutil

    from conftest import write_spec
    shutil.copy(tmp_path / "b" / "train.h5", tmp_path / "a" / "valid.h5")   # a pair by hand
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "a", goal={"max_steps": 3})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "prepared apart" in proc.stderr and "mean, std" in proc.stderr, proc.stderr
    assert not (tmp_path / "job").exists()
