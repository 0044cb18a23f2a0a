"""Checkpoint layer against real HDF5 files: round trips, corruption, truncation, atomicity."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi import h5store
from fleetmpi.engine import checkpoint
from fleetmpi.engine.checkpoint import (
    Checkpoint,
    check_compatible,
    latest_valid,
    list_checkpoints,
    load,
    save,
    summary,
)
from fleetmpi.errors import BadInput, CheckpointError, FleetError, TrainingFailed
from fleetmpi.h5store import read_h5_verified, write_h5_atomic

HASH_A = "a3" * 32
HASH_B = "b7" * 32


def random_arrays(seed: int) -> dict[str, np.ndarray]:
    """Arrays of several dtypes and shapes, random values (never all zeros)."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((5, 7)),
        "b": rng.standard_normal(7).astype(np.float32),
        "counts": rng.integers(-(2**62), 2**62, size=(3, 2, 4), dtype=np.int64),
        "order": rng.integers(2**63, 2**64 - 1, size=11, dtype=np.uint64, endpoint=True),
        "empty": np.empty(0, dtype=np.float64),
        "empty2d": np.empty((0, 3), dtype=np.int64),
        "scalar": np.array(rng.standard_normal()),
        "mask": rng.random(9) < 0.5,
        "big_endian": rng.standard_normal(4).astype(">f8"),
        "strided": rng.standard_normal((6, 6))[::2, ::3],
    }


def meta_for(step: int, model_hash: str = HASH_A) -> dict[str, object]:
    return {"model_hash": model_hash, "phase": "small", "loss": 0.25 + step, "rng": [1, 2, step]}


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, arr in want.items():
        assert got[name].shape == arr.shape, name
        assert got[name].dtype == arr.dtype.newbyteorder("<"), name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def one_line_with_path(exc: BaseException, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg
    assert str(path) in msg


# --- errors ---------------------------------------------------------------------------


def test_error_hierarchy_and_exit_codes() -> None:
    assert issubclass(CheckpointError, BadInput)
    assert issubclass(BadInput, ValueError) and issubclass(BadInput, FleetError)
    assert not issubclass(TrainingFailed, BadInput)
    assert BadInput.exit_code == 2 and CheckpointError.exit_code == 2
    assert TrainingFailed.exit_code == 1
    assert str(BadInput("a\n  b\r\nc")) == "a b c"


# --- low layer ------------------------------------------------------------------------


def test_h5_round_trip_dtypes_and_shapes(tmp_path: Path) -> None:
    arrays = random_arrays(1)
    meta = {"z": 1, "a": {"nested": [1.5, None, True, "x"]}}
    path = tmp_path / "model.h5"
    write_h5_atomic(path, arrays, meta, "model")
    got, got_meta = read_h5_verified(path, "model")
    assert_same_arrays(got, arrays)
    assert got_meta == meta
    assert read_h5_verified(path)[1] == meta  # kind=None accepts any kind
    with h5py.File(path, "r") as f:
        assert f.attrs["fleetmpi_format"] == "fleetmpi-h5/1"
        assert f.attrs["kind"] == "model"
        assert f.attrs["meta"] == json.dumps(meta, sort_keys=True)
        assert len(f.attrs["sha256"]) == 64
        assert sorted(f["arrays"]) == sorted(arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]  # no temp file left


def test_h5_wrong_kind_missing_file_and_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    write_h5_atomic(path, random_arrays(2), {}, "model")
    wrong_kind = r"kind is 'model' \(expected kind 'checkpoint'\)"
    with pytest.raises(CheckpointError, match=wrong_kind) as e:
        read_h5_verified(path, "checkpoint")
    one_line_with_path(e.value, path)

    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        read_h5_verified(tmp_path / "nope.h5")

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not an HDF5 file at all\n" * 10)
    with pytest.raises(CheckpointError, match="not a readable HDF5 file") as e:
        read_h5_verified(junk)
    one_line_with_path(e.value, junk)

    with pytest.raises(CheckpointError, match="not a regular file"):
        read_h5_verified(tmp_path)


def test_h5_foreign_hdf5_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["X"] = np.arange(3.0) + 1
    with pytest.raises(CheckpointError, match="attribute 'fleetmpi_format' is missing") as e:
        read_h5_verified(path)
    one_line_with_path(e.value, path)


@pytest.mark.parametrize(
    ("arrays", "meta", "kind", "error", "pattern"),
    [
        ({"a/b": np.ones(2)}, {}, "model", ValueError, "array name 'a/b' is not valid"),
        ({".": np.ones(2)}, {}, "model", ValueError, "array name '.' is not valid"),
        ({"o": np.array([object()])}, {}, "model", ValueError, "dtype object"),
        ({"s": np.array(["x"])}, {}, "model", ValueError, "dtype <U1"),
        ({"l": [1.0, 2.0]}, {}, "model", TypeError, "expected a numpy.ndarray"),
        ({"a": np.ones(2)}, {"n": np.int64(3)}, "model", TypeError, r"meta\['n'\].*\.item\(\)"),
        ({"a": np.ones(2)}, {1: "x"}, "model", TypeError, "expected str keys"),
        ({"a": np.ones(2)}, [], "model", TypeError, "expected a dict"),
        ({"a": np.ones(2)}, {}, "Bad Kind", ValueError, "file kind 'Bad Kind' is not valid"),
    ],
)
def test_h5_write_rejects_bad_input_and_writes_nothing(
    tmp_path: Path, arrays: dict, meta: dict, kind: str, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        write_h5_atomic(tmp_path / "x.h5", arrays, meta, kind)
    assert list(tmp_path.iterdir()) == []


def test_h5_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        write_h5_atomic(tmp_path / "no" / "x.h5", {"a": np.ones(2)}, {}, "model")


# --- corruption -------------------------------------------------------------------------


def test_checksum_catches_flipped_byte_in_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    ckpt_dir = tmp_path / "ckpt"
    path = save(ckpt_dir, 100, random_arrays(3), meta_for(100), keep=3)
    load(path)  # valid before the flip
    with h5py.File(path, "r") as f:
        ds = f["arrays/w"]
        offset = ds.id.get_offset()
        nbytes = ds.id.get_storage_size()
    assert offset is not None and nbytes > 0
    for trial in range(3):
        target = int(offset + rng.integers(0, nbytes))
        corrupt = tmp_path / f"flip{trial}" / path.name
        corrupt.parent.mkdir()
        data = bytearray(path.read_bytes())
        data[target] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="checksum mismatch") as e:
            load(corrupt)
        one_line_with_path(e.value, corrupt)


def test_checksum_covers_meta(tmp_path: Path) -> None:
    path = save(tmp_path, 5, random_arrays(4), meta_for(5), keep=1)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        assert meta["phase"] == "small"
        meta["phase"] = "large"  # same length: only the hash of the content can tell
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(path)


def test_truncation_is_detected_and_latest_valid_falls_back(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    older = random_arrays(10)
    save(ckpt_dir, 100, older, meta_for(100), keep=5)
    newest = save(ckpt_dir, 200, random_arrays(11), meta_for(200), keep=5)
    intact = newest.read_bytes()
    rng = np.random.default_rng(1234)
    cuts = [0, 1, 8, len(intact) - 1, *rng.integers(2, len(intact) - 1, size=8).tolist()]
    for cut in cuts:
        newest.write_bytes(intact[:cut])
        with pytest.raises(CheckpointError) as e:
            load(newest)
        one_line_with_path(e.value, newest)
        found, skipped = latest_valid(ckpt_dir)
        assert found is not None, cut
        assert found.step == 100 and found.path.name == "step-00000100.h5"
        assert_same_arrays(found.arrays, older)
        assert [p for p, _ in skipped] == [newest]
        assert skipped[0][1] and "\n" not in skipped[0][1]
    newest.write_bytes(intact)
    found, skipped = latest_valid(ckpt_dir)
    assert found is not None and found.step == 200 and skipped == []


def test_latest_valid_when_nothing_is_valid(tmp_path: Path) -> None:
    assert latest_valid(tmp_path / "missing") == (None, [])
    (tmp_path / "step-00000001.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    found, skipped = latest_valid(tmp_path)
    assert found is None and [p.name for p, _ in skipped] == ["step-00000001.h5"]


def test_renamed_checkpoint_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, 3, random_arrays(5), meta_for(3), keep=2)
    renamed = tmp_path / "step-00000009.h5"
    shutil.copy(path, renamed)
    with pytest.raises(CheckpointError, match="file name says step 9 but the file records step 3"):
        load(renamed)
    elsewhere = tmp_path / "copy.h5"
    shutil.copy(path, elsewhere)
    assert load(elsewhere).step == 3  # any other name is fine: the step comes from the file


def test_not_hdf5_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "step-00000001.h5"
    bad.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a readable HDF5 file") as e:
        load(bad)
    one_line_with_path(e.value, bad)


# --- save / list / prune ----------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    arrays = random_arrays(20)
    path = save(tmp_path / "job" / "ckpt", 42, arrays, meta_for(42), keep=2)
    assert path.name == "step-00000042.h5"
    ckpt = load(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.step == 42 and ckpt.path == path
    assert ckpt.meta == {**meta_for(42), "step": 42}
    assert_same_arrays(ckpt.arrays, arrays)
    with pytest.raises(AttributeError):
        ckpt.step = 1  # type: ignore[misc]


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    arrays = random_arrays(21)
    for keep in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep="):
            save(tmp_path, 1, arrays, {}, keep=keep)  # type: ignore[arg-type]
    for step in (-1, 2.0, True):
        with pytest.raises(ValueError, match="step"):
            save(tmp_path, step, arrays, {}, keep=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"meta\['step'\] is 7 but step is 8"):
        save(tmp_path, 8, arrays, {"step": 7}, keep=1)
    assert list(tmp_path.iterdir()) == []


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50, 60):
        save(tmp_path, step, random_arrays(step), meta_for(step), keep=3)
    (tmp_path / "notes.txt").write_text("user file\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000060.h5",
        "step-00000050.h5",
        "step-00000040.h5",
    ]
    save(tmp_path, 70, random_arrays(70), meta_for(70), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-00000070.h5"]


def test_keep_never_deletes_the_file_just_written(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save(tmp_path, step, random_arrays(step), meta_for(step), keep=3)
    written = save(tmp_path, 5, random_arrays(5), meta_for(5), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.h5", written.name]
    assert load(written).step == 5


def test_list_orders_by_step_number_not_name(tmp_path: Path) -> None:
    for step in (9, 100_000_000, 10):
        save(tmp_path, step, {"a": np.full(2, step + 0.5)}, {}, keep=10)
    assert [checkpoint._step_of(p) for p in list_checkpoints(tmp_path)] == [100_000_000, 10, 9]


def test_temp_file_from_a_crash_is_ignored(tmp_path: Path) -> None:
    good = save(tmp_path, 100, random_arrays(30), meta_for(100), keep=2)
    # A writer killed mid-write leaves a partial temp file of a newer step behind.
    partial = tmp_path / ".step-00000200.h5.tmp.99999"
    partial.write_bytes(good.read_bytes()[:500])
    assert list_checkpoints(tmp_path) == [good]
    found, skipped = latest_valid(tmp_path)
    assert found is not None and found.path == good and skipped == []
    save(tmp_path, 300, random_arrays(31), meta_for(300), keep=1)
    assert partial.exists()  # another process may still own it; pruning leaves it alone


# --- atomicity --------------------------------------------------------------------------


def test_failed_rename_leaves_old_file_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = save(tmp_path, 100, random_arrays(40), meta_for(100), keep=3)
    old_bytes = old.read_bytes()
    seen: list[str] = []

    def crash_instead_of_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        # At rename time the temp file is already complete and verifiable.
        seen.append(Path(src).name)
        assert read_h5_verified(Path(src), "checkpoint")[1]["step"] in (100, 200)
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(h5store.os, "replace", crash_instead_of_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 100, random_arrays(41), meta_for(100), keep=3)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 200, random_arrays(42), meta_for(200), keep=3)
    monkeypatch.undo()

    pid = os.getpid()
    assert seen == [f".step-00000100.h5.tmp.{pid}", f".step-00000200.h5.tmp.{pid}"]
    assert old.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000100.h5"]
    assert_same_arrays(load(old).arrays, random_arrays(40))


def test_write_fsyncs_file_before_rename_and_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to map file descriptors to paths")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(h5store.os, "fsync", fsync)
    monkeypatch.setattr(h5store.os, "replace", replace)
    path = tmp_path / "m.h5"
    write_h5_atomic(path, {"a": np.arange(4.0) + 1}, {}, "model")
    monkeypatch.undo()
    tmp = str(tmp_path.resolve() / f".m.h5.tmp.{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", str(path)), ("fsync", str(tmp_path.resolve()))]


# --- compatibility and summary ----------------------------------------------------------


def test_check_compatible(tmp_path: Path) -> None:
    ckpt = load(save(tmp_path, 1, random_arrays(50), meta_for(1, HASH_A), keep=1))
    check_compatible(ckpt, HASH_A)
    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, HASH_B)
    assert str(e.value) == (
        f"{ckpt.path}: checkpoint was written for model spec {HASH_A[:12]} but this job's "
        f"model spec is {HASH_B[:12]}; use a fresh --job-dir or the original spec"
    )
    legacy = load(save(tmp_path / "b", 1, random_arrays(51), {}, keep=1))
    with pytest.raises(CheckpointError, match="no 'model_hash'"):
        check_compatible(legacy, HASH_A)


def test_summary(tmp_path: Path) -> None:
    arrays = random_arrays(60)
    arrays["w"][0, 0] = np.nan
    arrays["w"][1, 1] = np.inf
    path = save(tmp_path, 77, arrays, meta_for(77), keep=1)
    info = summary(path)
    json.dumps(info)  # ready for `fleetmpi inspect --json`
    assert info["step"] == 77 and info["kind"] == "checkpoint"
    assert info["format"] == "fleetmpi-h5/1" and len(info["sha256"]) == 64
    assert info["meta"]["model_hash"] == HASH_A
    assert info["size_bytes"] == path.stat().st_size
    w = info["arrays"]["w"]
    finite = arrays["w"][np.isfinite(arrays["w"])]
    assert w["dtype"] == "float64" and w["shape"] == [5, 7] and w["size"] == 35
    assert w["nan_count"] == 1 and w["inf_count"] == 1
    assert w["min"] == finite.min() and w["max"] == finite.max()
    assert w["mean"] == pytest.approx(finite.mean()) and w["std"] == pytest.approx(finite.std())
    order = info["arrays"]["order"]
    assert order["dtype"] == "uint64" and order["max"] == int(arrays["order"].max())
    assert info["arrays"]["mask"]["true_count"] == int(arrays["mask"].sum())
    assert info["arrays"]["empty"] == {
        "dtype": "float64",
        "shape": [0],
        "size": 0,
        "nbytes": 0,
        "nan_count": 0,
        "inf_count": 0,
    }

    model = tmp_path / "model.h5"
    write_h5_atomic(model, {"coef": np.arange(3.0) + 0.5}, {"model_hash": HASH_A}, "model")
    assert summary(model)["kind"] == "model" and summary(model)["step"] is None
