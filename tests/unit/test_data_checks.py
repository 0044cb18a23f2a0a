"""Bad data is bad input, found at start-up: NaN/inf, absurd labels, files that are not files, hollow shapes.

Each case writes a real HDF5 file with random data (never zeros) and one thing made wrong,
and expects describe() to raise BadInput naming the file, the dataset and, for values, the
first bad row, without reading more than one pass and without blocking.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from fleetmpi.engine import h5rows
from fleetmpi.engine.data import describe
from fleetmpi.engine.h5rows import open_h5
from fleetmpi.errors import BadInput
from fleetmpi.makedata import check_room
from fleetmpi.spec import MAX_CLASSES

N, D, K = 300, 6, 3


def rand_x(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def labels(n: int = N, k: int = K, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n).astype(np.float32)


def write(path: Path, X: np.ndarray, y: np.ndarray, **kw: object) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=X, **kw)   # type: ignore[arg-type]
        f.create_dataset("y", data=y, **kw)   # type: ignore[arg-type]
    return path


def assert_refused(path: Path, task: str, *expect: str, classes: int | None = None) -> str:
    box: list[BaseException | object] = []

    def target() -> None:
        try:
            box.append(describe(path, task, classes))
        except BaseException as e:  # BadInput is expected; anything else is the failure under test
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), f"describe({path}) blocked"
    (out,) = box
    assert isinstance(out, BadInput), f"expected BadInput, got {out!r}"
    msg = str(out)
    assert "\n" not in msg and str(path) in msg, msg
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("task", ["multiclass", "regression"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_x_names_row_and_column(tmp_path: Path, task: str, bad: float) -> None:
    X = rand_x()
    X[123, 4] = bad
    X[200, 1] = np.nan   # a later bad row: the first one is named
    y = labels() if task == "multiclass" else rand_x(N, 1)[:, 0]
    assert_refused(write(tmp_path / "x.h5", X, y), task, "dataset X", "row 123", "column 4",
            "NaN" if np.isnan(bad) else "inf")


def test_nonfinite_x_in_chunked_compressed_file(tmp_path: Path) -> None:
    X = rand_x(5000)
    X[4321, 0] = np.inf
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=X, chunks=(512, D), compression="gzip")
        f.create_dataset("y", data=labels(5000), chunks=(512,), compression="gzip")
    assert_refused(path, "multiclass", "dataset X", "inf", "row 4321", "column 0")


def test_block_boundaries_do_not_hide_a_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks (a real setting, not a fake) make the bad row fall in a later block.
    monkeypatch.setattr(h5rows, "CHECK_BLOCK_BYTES", 7 * D * 4)
    X = rand_x()
    X[N - 1, D - 1] = np.nan
    assert_refused(write(tmp_path / "x.h5", X, labels()), "multiclass", f"row {N - 1}", f"column {D - 1}")


def test_nonfinite_regression_target(tmp_path: Path) -> None:
    y = rand_x(N, 1)[:, 0]
    y[77] = np.nan
    assert_refused(write(tmp_path / "r.h5", rand_x(), y), "regression", "dataset y", "NaN", "row 77")


def test_check_false_skips_the_finite_pass(tmp_path: Path) -> None:
    X = rand_x()
    X[5, 5] = np.nan
    info = describe(write(tmp_path / "x.h5", X, labels()), "multiclass", check=False)
    assert (info.n, info.d, info.classes) == (N, D, K)


def test_clean_file_passes_with_check(tmp_path: Path) -> None:
    info = describe(write(tmp_path / "ok.h5", rand_x(), labels()), "multiclass")
    assert (info.n, info.d, info.classes) == (N, D, K)
    info = describe(write(tmp_path / "okr.h5", rand_x(), rand_x(N, 1)[:, 0]), "regression")
    assert (info.n, info.d, info.classes) == (N, D, None)


def test_huge_label_is_refused_not_allocated(tmp_path: Path) -> None:
    y = labels().astype(np.float64)
    y[9] = 2.0**40
    assert_refused(write(tmp_path / "big.h5", rand_x(), y), "multiclass", "label 1099511627776", f"{MAX_CLASSES}")


def test_label_just_under_the_limit_is_accepted(tmp_path: Path) -> None:
    y = labels()
    y[0] = MAX_CLASSES - 1
    assert describe(write(tmp_path / "k.h5", rand_x(), y), "multiclass").classes == MAX_CLASSES


def test_huge_classes_attribute_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.h5", rand_x(), labels())
    with h5py.File(path, "a") as f:
        f.attrs["classes"] = 2**40
    assert_refused(path, "multiclass", "attribute classes")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    assert_refused(fifo, "multiclass", "not a regular file")


def test_device_named_h5_is_refused(tmp_path: Path) -> None:
    dev = tmp_path / "zero.h5"
    dev.symlink_to("/dev/zero")
    assert_refused(dev, "multiclass", "not a regular file")
    with pytest.raises(BadInput, match="not a regular file"):
        open_h5(dev)


def test_declared_2_40_rows_contiguous_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hollow.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", shape=(2**40, D), dtype="f4")
        f.create_dataset("y", shape=(2**40,), dtype="f4")
    assert_refused(path, "multiclass", "dataset X", "declares shape (1099511627776, 6)")


def test_declared_2_40_rows_chunked_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hollowc.h5"
    with h5py.File(path, "w") as f:
        X = f.create_dataset("X", shape=(2**40, D), dtype="f4", chunks=(1024, D))
        X[:1024] = rand_x(1024)
        y = f.create_dataset("y", shape=(2**40,), dtype="f4", chunks=(1024,))
        y[:1024] = labels(1024)
    assert_refused(path, "multiclass", "dataset X", "chunks are written")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.h5", rand_x(20000), labels(20000))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 40000)
    msg = assert_refused(path, "multiclass")
    assert "dataset" in msg or "not a readable HDF5 file" in msg


def test_make_data_room_check() -> None:
    with pytest.raises(BadInput, match=r"--n 99999999999999 .* memory"):
        check_room("multiclass", 99_999_999_999_999, 20, 4, Path("/tmp/never-made"))
    check_room("multiclass", 1000, 20, 4, Path("/tmp/never-made"))


@pytest.mark.parametrize(("model", "data", "says"), [
    ({"kind": "forest", "trees": 3}, "multiclass",
     "kind forest trains binary (labels 0/1) unless told: set model.task: multiclass"),
    ({"kind": "gbdt", "trees": 3}, "regression", "for kind gbdt set model.task: regression"),
    ({"kind": "mlp", "hidden": [4]}, "regression", "for kind mlp set model.task: regression"),
])
def test_kinds_with_a_task_key_name_it_when_the_labels_do_not_fit(tmp_path: Path, datasets: dict[str, Path],
                                                                  model: dict, data: str, says: str) -> None:
    """A tree or MLP spec on labels of another task points at model.task, not at another model kind."""
    from conftest import write_spec

    from fleetmpi import spec as specmod
    from fleetmpi.errors import BadInput
    from fleetmpi.preflight import check_inputs
    raw = yaml.safe_load(write_spec(tmp_path / "s.yaml", datasets[data], model=model, goal={"max_steps": 3}).read_text())
    if model["kind"] != "mlp":
        raw.pop("optimizer")   # tree kinds take none
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(BadInput) as e:
        check_inputs(specmod.load(tmp_path / "s.yaml"))
    assert says in str(e.value) and "kind softmax" not in str(e.value), str(e.value)
