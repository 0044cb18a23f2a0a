"""Own data in: make-data from CSV, Parquet, NPY and LIBSVM against pandas/numpy reads of the same files.

Random data with named columns and string labels; the conversion runs through the real CLI
(and in-process with tiny chunks to show streaming gives the same file). Bad input exits 2
with one line naming the file, row or column.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli

from fleetmpi import tabular
from fleetmpi.convert import Source, convert
from fleetmpi.preprocess import Record, read_record

pd = pytest.importorskip("pandas", reason="pandas reads the reference tables (pip install -e '.[dev]')")

CLASSES = ["setosa", "versicolor", "virginica"]


def _frame(n: int = 300, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "petal length": rng.normal(3.0, 2.0, n).round(6),
        "width": rng.uniform(-5, 5, n).round(6),
        "mass": rng.exponential(4.0, n).round(6),
        "colour": rng.choice(["red", "green", "blue"], n),
        "species": rng.choice(CLASSES, n),
    })


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, Record]:
    with h5py.File(path, "r") as f:
        X, y = f["X"][()], f["y"][()]
        assert f["X"].chunks is None, "X must be contiguous so the engine maps it"
    rec = read_record(path)
    assert rec is not None
    return X, y, rec


def _make(*args: str) -> None:
    proc = cli("make-data", *args)
    assert proc.returncode == 0, proc.stderr


def _expected(df: pd.DataFrame, numeric: list[str], standardize: bool) -> np.ndarray:
    X = df[numeric].to_numpy(np.float64)
    if standardize:
        X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X


def test_csv_round_trip_matches_pandas(tmp_path: Path) -> None:
    df = _frame()
    df.to_csv(tmp_path / "iris.csv", index=False)
    _make("--from", "csv", str(tmp_path / "iris.csv"), "--label", "species", "--categorical", "colour",
          "--standardize", "--valid-fraction", "0", "--out", str(tmp_path / "d"))
    X, y, rec = _read(tmp_path / "d" / "train.h5")
    numeric = ["petal length", "width", "mass"]
    np.testing.assert_allclose(X[:, :3], _expected(df, numeric, True), rtol=2e-6, atol=2e-6)
    levels = sorted(df["colour"].unique())
    np.testing.assert_array_equal(X[:, 3:], (df["colour"].to_numpy()[:, None] == np.array(levels)).astype(np.float32))
    np.testing.assert_array_equal(y, df["species"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy())
    assert rec.classes == CLASSES and rec.task == "multiclass"
    assert rec.features == numeric + [f"colour={c}" for c in levels]
    with h5py.File(tmp_path / "d" / "train.h5", "r") as f:
        assert int(f.attrs["classes"]) == 3
    assert not (tmp_path / "d" / "valid.h5").exists()


def test_parquet_round_trip_matches_pandas(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (pip install 'fleetmpi[parquet]')")
    df = _frame(seed=8)
    df["count"] = np.random.default_rng(1).integers(0, 50, len(df))
    df.to_parquet(tmp_path / "t.parquet", index=False)
    _make("--from", "parquet", str(tmp_path / "t.parquet"), "--label", "species", "--categorical", "colour",
          "--valid-fraction", "0", "--out", str(tmp_path / "d"))
    X, y, rec = _read(tmp_path / "d" / "train.h5")
    assert rec.columns == ["petal length", "width", "mass", "colour", "count"]
    np.testing.assert_allclose(X[:, :3], _expected(df, ["petal length", "width", "mass"], False), rtol=1e-6)
    np.testing.assert_array_equal(X[:, -1], df["count"].to_numpy(np.float32))
    np.testing.assert_array_equal(y, df["species"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy())


def test_npy_round_trip_maps_labels_1_to_3(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    X0 = rng.standard_normal((250, 6))
    y0 = rng.integers(1, 4, 250)   # 1..3: three classes, not four
    np.save(tmp_path / "X.npy", X0)
    np.save(tmp_path / "y.npy", y0)
    _make("--from", "npy", str(tmp_path / "X.npy"), "--labels", str(tmp_path / "y.npy"), "--valid-fraction", "0",
          "--out", str(tmp_path / "d"))
    X, y, rec = _read(tmp_path / "d" / "train.h5")
    np.testing.assert_array_equal(X, X0.astype(np.float32))
    np.testing.assert_array_equal(y, y0 - 1)
    assert rec.classes == ["1", "2", "3"] and rec.task == "multiclass"
    with h5py.File(tmp_path / "d" / "train.h5", "r") as f:
        assert int(f.attrs["classes"]) == 3


def test_libsvm_round_trip_densifies(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    dense = np.where(rng.random((120, 9)) < 0.3, rng.standard_normal((120, 9)).round(5), 0.0)
    labels = rng.choice([-1, 1], 120)
    lines = [" ".join([f"{lab:+d}", *(f"{j + 1}:{v}" for j, v in enumerate(row) if v != 0)])
             for lab, row in zip(labels, dense, strict=True)]
    (tmp_path / "a.svm").write_text("\n".join(lines) + "\n")
    _make("--from", "libsvm", str(tmp_path / "a.svm"), "--valid-fraction", "0", "--out", str(tmp_path / "d"))
    X, y, rec = _read(tmp_path / "d" / "train.h5")
    width = max(j + 1 for row in dense for j in np.flatnonzero(row)) + 1   # 1-based indices: column 0 stays empty
    np.testing.assert_array_equal(X[:, 1:], dense[:, :width - 1].astype(np.float32))
    np.testing.assert_array_equal(y, (labels == 1).astype(np.float32))
    assert rec.task == "binary" and rec.classes == ["-1", "1"]


def test_valid_fraction_is_a_seeded_partition(tmp_path: Path) -> None:
    df = _frame(n=400).drop(columns="colour")
    df.to_csv(tmp_path / "t.csv", index=False)
    for out in ("a", "b"):
        _make("--from", "csv", str(tmp_path / "t.csv"), "--label", "species", "--valid-fraction", "0.3",
              "--seed", "4", "--out", str(tmp_path / out))
    Xt, _, _ = _read(tmp_path / "a" / "train.h5")
    Xv, _, _ = _read(tmp_path / "a" / "valid.h5")
    assert 60 < len(Xv) < 180 and len(Xt) + len(Xv) == 400
    both = np.concatenate([Xt, Xv])
    ref = df[["petal length", "width", "mass"]].to_numpy(np.float32)
    np.testing.assert_array_equal(both[np.lexsort(both.T)], ref[np.lexsort(ref.T)])
    np.testing.assert_array_equal(_read(tmp_path / "b" / "valid.h5")[0], Xv)


def test_small_chunks_write_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    df = _frame(n=500, seed=11)
    df.loc[[3, 77, 401], "width"] = np.nan
    df.to_csv(tmp_path / "t.csv", index=False)
    src = Source(tmp_path / "t.csv", "csv", label="species", valid_fraction=0.25, seed=9)
    convert(src, tmp_path / "big", standardize=True, categorical=("colour",), fill=True)
    monkeypatch.setattr(tabular, "CHUNK_CELLS", 37)   # a few rows per chunk: many chunks, same statistics
    convert(src, tmp_path / "small", standardize=True, categorical=("colour",), fill=True)
    for name in ("train.h5", "valid.h5"):
        a, b = _read(tmp_path / "big" / name), _read(tmp_path / "small" / name)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a[1], b[1])
    rec = _read(tmp_path / "big" / "train.h5")[2]
    assert rec.fill["width"] == pytest.approx(rec.mean[1] if rec.mean else 0.0)


def test_task_auto_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    np.save(tmp_path / "X.npy", rng.standard_normal((100, 3)))
    np.save(tmp_path / "reg.npy", rng.standard_normal(100))
    np.save(tmp_path / "two.npy", rng.choice([3, 7], 100))
    for labels, task in (("reg.npy", "regression"), ("two.npy", "binary")):
        _make("--from", "npy", str(tmp_path / "X.npy"), "--labels", str(tmp_path / labels), "--out",
              str(tmp_path / task))
        assert _read(tmp_path / task / "train.h5")[2].task == task


def _bad(tmp_path: Path, *args: str) -> str:
    proc = cli("make-data", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(("content", "extra", "expect"), [
    ("a,b,y\n1,2,x\n3,4\n", [], ["t.csv", "data row 2", "2 fields", "3"]),                 # ragged
    ("a,b,y\n", [], ["t.csv", "no data rows"]),                                             # header only
    ("a,b,z\n1,2,x\n3,4,y\n", [], ["--label y", "no such column", "a, b, z"]),               # no label column
    ("a,b,y\n1,red,x\n3,blue,y\n", [], ["t.csv", "'b'", "not numeric", "--categorical b"]),  # text feature
    ("a,b,y\n1,2,x\n3,oops,y\n", [], ["t.csv", "data row 2 of 'b' holds 'oops'"]),    # the cell that is text
    ("a,b,y\n1,2,x\n3,,y\n5,nan,y\n", [], ["t.csv", "missing value", "data row 2", "'b'", "--fill mean"]),
    ("a,b,y\n1,2,x\n3,4,y\n", ["--task", "regression"], ["t.csv", "'y'", "text", "regression"]),
])
def test_bad_csv_exits_2_naming_it(tmp_path: Path, content: str, extra: list[str], expect: list[str]) -> None:
    (tmp_path / "t.csv").write_text(content)
    line = _bad(tmp_path, "--from", "csv", str(tmp_path / "t.csv"), "--label", "y", *extra, "--out",
                str(tmp_path / "d"))
    for part in expect:
        assert part in line, line
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_class_only_in_valid_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,y\n1,cat\n2,dog\n3,cat\n")
    (tmp_path / "v.csv").write_text("a,y\n1,cat\n2,emu\n")
    line = _bad(tmp_path, "--from", "csv", str(tmp_path / "t.csv"), "--label", "y", "--valid", str(tmp_path / "v.csv"),
                "--out", str(tmp_path / "d"))
    assert "v.csv" in line and "'emu'" in line and "cat, dog" in line, line
    assert not list((tmp_path / "d").glob("*.h5")), "nothing is published when a pass fails"
    assert not list((tmp_path / "d").glob(".*tmp*")), "temp files are removed"


def test_unwritable_out_and_unknown_source(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,y\n1,cat\n2,dog\n")
    # /proc refuses new folders even to root, where a chmod'ed folder would not.
    line = _bad(tmp_path, "--from", "csv", str(tmp_path / "t.csv"), "--label", "y", "--out", "/proc/fleetmpi-d")
    assert "--out /proc/fleetmpi-d" in line and "writable" in line, line
    line = _bad(tmp_path, "--from", str(tmp_path / "t.csv"), "--out", str(tmp_path / "d"))
    assert "--from csv" in line, line
    line = _bad(tmp_path, "--from", "digits", "--task", "binary", "--out", str(tmp_path / "d"))
    assert "multiclass" in line and "digits" in line, line


def test_record_json_round_trip() -> None:
    rec = Record(columns=["a"], features=["a"], label="y", task="binary", classes=["n", "y"], mean=[0.5], std=[2.0])
    assert Record.from_meta(json.loads(rec.to_json())) == rec
