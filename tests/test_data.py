"""Per-rank HDF5 reads: the rows a rank gets are the rows the sample order names."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.data import RankReader, SampleOrder, contiguous_share, row_fingerprint


@pytest.fixture()
def h5file(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((503, 7)).astype(np.float32)
    y = rng.integers(0, 5, 503)  # int64 on disk: read converts to float32
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = X, y
    return path, X, y


@pytest.mark.parametrize("P", [1, 2, 3])
def test_rank_reads_match_the_order_across_epoch_boundaries(h5file: tuple, P: int) -> None:
    path, X, y = h5file
    reader = RankReader(path)
    order = SampleOrder(503, 61, seed=4, block_rows=16)
    for step in range(0, 40):  # 40 * 61 > 4 epochs: many batches straddle a boundary
        got_x, got_y, fp = [], [], 0.0
        for r in range(P):
            xr, yr, f = reader.read(order.ranges(*order.share(step, r, P)))
            got_x.append(xr.copy())
            got_y.append(yr.copy())
            fp += f
        rows = [i for lo, hi in order.ranges(step * 61, (step + 1) * 61) for i in range(lo, hi)]
        key = np.lexsort(X[rows].T)
        gx = np.concatenate(got_x)
        np.testing.assert_array_equal(gx[np.lexsort(gx.T)], X[rows][key])
        np.testing.assert_array_equal(np.sort(np.concatenate(got_y)), np.sort(y[rows].astype(np.float32)))
        assert fp == sum(row_fingerprint(i, i + 1) for i in rows)
    reader.close()


def test_contiguous_shares_cover_rows_once() -> None:
    for n in (0, 1, 7, 100):
        for P in (1, 2, 3, 8):
            shares = [contiguous_share(n, r, P) for r in range(P)]
            assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))
