"""CSR data files: describe()'s one-pass checks and CsrReader's rows against scipy.sparse slicing."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from fleetmpi.engine.csr_data import CsrReader
from fleetmpi.engine.data import SampleOrder, describe
from fleetmpi.errors import BadInput


def write(path: Path, M: sp.csr_matrix, y: np.ndarray, **fix: np.ndarray) -> Path:
    arrays = {"indptr": M.indptr.astype(np.int64), "indices": M.indices.astype(np.int32),
              "data": M.data.astype(np.float32), "y": y, **fix}
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
        f.attrs["format"], f.attrs["n_features"] = "csr", M.shape[1]
    return path


@pytest.fixture
def matrix() -> tuple[sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(5)
    D = np.where(rng.random((200, 50)) < 0.1, rng.standard_normal((200, 50)), 0.0)
    D[::7] = 0.0   # empty rows
    return sp.csr_matrix(D.astype(np.float32)), rng.integers(0, 3, 200).astype(np.float32)


def test_reader_returns_the_rows_of_the_sample_order(tmp_path: Path, matrix: tuple) -> None:
    M, y = matrix
    path = write(tmp_path / "t.h5", M, y)
    info = describe(path, "multiclass")
    assert (info.n, info.d, info.classes) == (200, 50, 3)
    order = SampleOrder(200, 64, 3, 8)
    for direct in (True, False):
        r = CsrReader(path, direct)
        assert r.direct == direct
        for step in (0, 3, 4):   # step 3 spans the epoch boundary
            ranges = order.ranges(*order.share(step, 1, 3))
            X, yy, _ = r.read(ranges)
            rows = np.concatenate([np.arange(lo, hi) for lo, hi in sorted(ranges)])
            assert np.array_equal(X.toarray(), M[rows].toarray()) and np.array_equal(yy, y[rows])
        r.close()


def test_mapped_and_hdf5_reads_agree_on_any_ranges_and_y_dtype(tmp_path: Path, matrix: tuple) -> None:
    # The map path is one numba copy (kernels.gather.gather_csr); the HDF5 path reads each
    # range. Random ranges, overlapping and repeated ones included, as a list or an array.
    M, y = matrix
    rng = np.random.default_rng(8)
    for ydt in (np.float32, np.int64, np.float64, np.int32):
        path = write(tmp_path / f"y-{np.dtype(ydt).name}.h5", M, y.astype(ydt))
        fast, slow = CsrReader(path), CsrReader(path, direct=False)
        assert fast.direct and not slow.direct
        for _ in range(30):
            lo = rng.integers(0, 195, int(rng.integers(1, 9)))
            ranges = [(int(a), int(min(200, a + rng.integers(1, 30)))) for a in lo] + [(7, 7)]
            (xa, ya, fa), (xb, yb, fb) = fast.read(ranges), slow.read(np.array(ranges[::-1], np.int64))
            rows = np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])
            for X in (xa, xb):
                assert X.indptr.dtype == np.int64 and X.indices.dtype == np.int32 and X.data.dtype == np.float32
                assert np.array_equal(X.toarray(), M[rows].toarray())
            assert np.array_equal(xa.indptr, xb.indptr) and np.array_equal(xa.indices, xb.indices)
            assert ya.dtype == yb.dtype == np.float32 and np.array_equal(ya, yb) and np.array_equal(ya, y[rows])
            assert fa == fb
        fast.close()
        slow.close()


def test_a_batch_is_a_view_the_next_read_overwrites_and_copies_are_not(tmp_path: Path, matrix: tuple) -> None:
    # As RankReader's: read() reuses its buffers; read_contiguous() and CsrBatch.copy() (what
    # L-BFGS's fixed batch keeps) own their arrays.
    M, y = matrix
    r = CsrReader(write(tmp_path / "t.h5", M, y))
    shard, shard_y = r.read_contiguous(0, 120)
    first, first_y, _ = r.read([(0, 60)])
    kept, kept_y = first.copy(), first_y.copy()
    assert kept.indices is not first.indices and np.array_equal(kept.toarray(), first.toarray())
    r.read([(100, 160)])   # as many rows: written over the same front of the buffers
    assert np.array_equal(first_y, y[100:160])
    assert np.array_equal(kept.toarray(), M[:60].toarray()) and np.array_equal(kept_y, y[:60])
    assert np.array_equal(shard.toarray(), M[:120].toarray()) and np.array_equal(shard_y, y[:120])
    r.close()


@pytest.mark.parametrize("what", ["id-high", "id-negative", "indptr-down", "indptr-past-nnz", "indptr-spike"])
def test_a_file_damaged_after_its_checks_is_refused_by_both_reads(tmp_path: Path, matrix: tuple, what: str) -> None:
    # describe() checks the file once; a file changed while the job runs must not send a
    # kernel outside the model, nor make the copy read out of bounds.
    M, y = matrix
    ip, ix = M.indptr.astype(np.int64), M.indices.astype(np.int32)
    if what == "id-high":
        ix = np.where(np.arange(M.nnz) == 40, 50, ix).astype(np.int32)
    elif what == "id-negative":
        ix = np.where(np.arange(M.nnz) == 40, -1, ix).astype(np.int32)
    elif what == "indptr-down":
        ip = ip.copy()
        ip[20] = ip[18]   # row 19 running backwards
    elif what == "indptr-past-nnz":
        ip = ip.copy()
        ip[150:] = M.nnz + 1000
    else:   # one offset past nnz inside a range whose ends are sound
        ip = ip.copy()
        ip[150] = M.nnz + 1000
    path = write(tmp_path / f"{what}.h5", M, y, indptr=ip, indices=ix)
    for direct in (True, False):
        r = CsrReader(path, direct)
        inner = {"indptr-down": (15, 25), "indptr-past-nnz": (140, 170), "indptr-spike": (140, 170)}.get(what, (0, 60))
        for ranges in ([(0, 200)], [inner]):   # the whole file, and a range with the damage inside
            with pytest.raises(BadInput, match="damaged or changed while the job ran"):
                r.read(ranges)
        r.close()


def test_csr_ranges_past_the_files_rows_are_refused_and_odd_labels_go_through_hdf5(tmp_path: Path,
                                                                                  matrix: tuple) -> None:
    M, y = matrix
    for direct in (True, False):
        r = CsrReader(write(tmp_path / f"t{direct}.h5", M, y), direct)
        for ranges in ([(0, 201)], [(190, 205)], [(0, 10**6)]):
            with pytest.raises(BadInput, match="holds 200 rows"):
                r.read(ranges)
        r.close()
    r = CsrReader(write(tmp_path / "f16.h5", M, y.astype(np.float16)))
    assert not r.direct   # numba's copy takes no float16: HDF5 converts it
    X, yy, _ = r.read([(5, 25)])
    assert np.array_equal(X.toarray(), M[5:25].toarray()) and np.array_equal(yy, y[5:25])
    r.close()


@pytest.mark.parametrize("what, fix, match", [
    ("id", lambda M: {"indices": np.where(np.arange(M.nnz) == 5, 50, M.indices).astype(np.int32)}, "outside"),
    ("order", lambda M: {"indices": np.concatenate(([M.indices[1], M.indices[0]], M.indices[2:])).astype(np.int32)},
     "increase strictly"),
    ("nan", lambda M: {"data": np.where(np.arange(M.nnz) == 9, np.nan, M.data).astype(np.float32)}, "NaN"),
    ("indptr", lambda M: {"indptr": np.concatenate(([0, 3, 2], M.indptr[3:])).astype(np.int64)}, "decreases"),
])
def test_describe_refuses_bad_csr(tmp_path: Path, matrix: tuple, what: str, fix, match: str) -> None:
    M, y = matrix
    path = write(tmp_path / f"{what}.h5", M, y, **fix(M))
    with pytest.raises(BadInput, match=match):
        describe(path, "multiclass")


def test_damaged_and_short_files_are_refused_with_numbas_bounds_checks_on(tmp_path: Path) -> None:
    # The copy kernels check no bounds of their own: run the refusal tests above with
    # numba's bounds checking on (fresh cache: it is a compile option), where an index past
    # any array raises IndexError instead of reading memory that is not the file's.
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                           f"{__file__}::test_a_file_damaged_after_its_checks_is_refused_by_both_reads",
                           f"{__file__}::test_csr_ranges_past_the_files_rows_are_refused_and_odd_labels_go_through_hdf5"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("6 passed"), proc.stdout[-3000:] + proc.stderr[-2000:]
