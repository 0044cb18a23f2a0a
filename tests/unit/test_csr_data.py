"""CSR data files: describe()'s one-pass checks and CsrReader's rows against scipy.sparse slicing."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from fleetmpi.engine.data import CsrReader, SampleOrder, describe
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
