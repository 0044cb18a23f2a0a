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
    # a quote left open would read the rest of the file into one cell
    ("a,b,y\n1,2,x\n3,\"4,y\n5,6,x\n", [], ["t.csv", "data row 2", "not readable as CSV", "quote"]),
    ("a,b,y\n1,\"2\"z,x\n", [], ["t.csv", "data row 1", "not readable as CSV"]),
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


def test_rows_are_numbered_in_the_file_after_the_validation_split(tmp_path: Path) -> None:
    """A refusal names the row of the file, not of the training part the split left."""
    df = _frame(200, seed=3).drop(columns="colour")
    df["width"] = df["width"].astype(object)
    df.loc[150, "width"] = ""            # data row 151
    df.to_csv(tmp_path / "t.csv", index=False)
    for fraction in ("0", "0.5"):
        line = _bad(tmp_path, "--from", "csv", str(tmp_path / "t.csv"), "--label", "species", "--valid-fraction",
                    fraction, "--out", str(tmp_path / "d"))
        assert "missing value at data row 151, column 'width'" in line, (fraction, line)


def test_libsvm_row_without_label_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.svm").write_text("1 1:0.5 2:1\n-1 1:0.1\n1:0.3 2:0.4\n1 2:2\n")
    line = _bad(tmp_path, "--from", "libsvm", str(tmp_path / "t.svm"), "--out", str(tmp_path / "d"))
    assert "t.svm: line 3 starts with '1:0.3', not a label" in line, line


def test_header_only_valid_file_is_refused(tmp_path: Path) -> None:
    _frame(50).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "v.csv").write_text((tmp_path / "t.csv").read_text().splitlines()[0] + "\n")
    line = _bad(tmp_path, "--from", "csv", str(tmp_path / "t.csv"), "--label", "species", "--categorical", "colour",
                "--valid", str(tmp_path / "v.csv"), "--out", str(tmp_path / "d"))
    assert "--valid" in line and "v.csv" in line and "no data rows" in line, line


def test_without_a_validation_part_an_old_valid_file_goes(tmp_path: Path) -> None:
    """A folder never holds train.h5 and valid.h5 of two conversions."""
    _frame(300).to_csv(tmp_path / "t.csv", index=False)
    base = ["--from", "csv", str(tmp_path / "t.csv"), "--label", "species", "--categorical", "colour",
            "--out", str(tmp_path / "d")]
    _make(*base)
    assert (tmp_path / "d" / "valid.h5").exists()
    _make(*base, "--valid-fraction", "0")
    assert (tmp_path / "d" / "train.h5").exists() and not (tmp_path / "d" / "valid.h5").exists()
    for fraction in ("0.2", "0"):   # the built-in sets alike
        _make("--from", "synthetic", "--n", "100", "--d", "3", "--valid-fraction", fraction, "--out", str(tmp_path / "s"))
    assert not (tmp_path / "s" / "valid.h5").exists()


def test_parquet_numbers_stored_as_text_read_as_numbers(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (pip install 'fleetmpi[parquet]')")
    df = _frame(80, seed=9).drop(columns="colour")
    as_text = df.assign(width=df["width"].map(repr).astype(object))
    as_text.loc[7, "width"] = None
    as_text.to_parquet(tmp_path / "t.parquet", index=False)
    _make("--from", "parquet", str(tmp_path / "t.parquet"), "--label", "species", "--fill", "mean",
          "--valid-fraction", "0", "--out", str(tmp_path / "d"))
    X, _, rec = _read(tmp_path / "d" / "train.h5")
    width = df["width"].to_numpy(np.float64)
    fill = np.delete(width, 7).mean()
    np.testing.assert_allclose(X[:, 1], np.where(np.arange(80) == 7, fill, width), rtol=1e-6)
    assert rec.features == ["petal length", "width", "mass"]
    as_text.loc[7, "width"] = "wide"
    as_text.to_parquet(tmp_path / "u.parquet", index=False)
    for fraction in ("0", "0.2"):   # with the split, row 8 falls in the validation part (seed 0)
        line = _bad(tmp_path, "--from", "parquet", str(tmp_path / "u.parquet"), "--label", "species",
                    "--valid-fraction", fraction, "--out", str(tmp_path / "e"))
        assert "'width'" in line and "not numeric" in line and "data row 8" in line and "'wide'" in line, line
