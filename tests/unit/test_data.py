"""Per-rank HDF5 reads: the rows a rank gets are the rows the sample order names."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.engine.data import RankReader, SampleOrder, contiguous_share, row_fingerprint


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


def _reference_ranges(order: SampleOrder, start: int, stop: int) -> list[int]:
    """Rows of stream positions [start, stop), one at a time, from the permutation itself."""
    rows = []
    for pos in range(start, stop):
        e, off = divmod(pos, order.n)
        perm = np.random.default_rng([order.seed, e]).permutation(order.nblocks)
        block_rows = [i for b in perm for i in range(b * order.block_rows, min((b + 1) * order.block_rows, order.n))]
        rows.append(block_rows[off])
    return rows


@pytest.mark.parametrize(("n", "batch", "block_rows"), [(503, 61, 16), (100, 7, 1), (64, 200, 8), (97, 13, 97)])
def test_sample_order_ranges_visit_the_permuted_blocks(n: int, batch: int, block_rows: int) -> None:
    order = SampleOrder(n, batch, seed=9, block_rows=block_rows)
    for step in (0, 1, 5, 17):
        start, stop = step * batch, (step + 1) * batch
        got = order.ranges(start, stop)
        assert [i for lo, hi in got for i in range(lo, hi)] == _reference_ranges(order, start, stop)
        assert all(a[1] != b[0] for a, b in zip(got, got[1:])), got   # adjacent blocks are coalesced
        assert all(hi > lo for lo, hi in got)


def _write(path: Path, X: np.ndarray, y: np.ndarray, **kw: object) -> Path:
    with h5py.File(path, "w", **({"userblock_size": kw.pop("userblock_size")} if "userblock_size" in kw else {})) as f:
        f.create_dataset("X", data=X, **kw)
        f.create_dataset("y", data=y, **kw)
    return path


@pytest.mark.parametrize("layout", ["contiguous", "userblock", "chunked-gzip", "y-big-endian", "y-float64"])
def test_memory_mapped_reads_equal_hdf5_reads(tmp_path: Path, layout: str) -> None:
    # The map is taken only where the bytes lie in the file as one run; elsewhere HDF5 reads.
    # Either way the rows, their order and the fingerprint are the same.
    rng = np.random.default_rng(5)
    X = rng.standard_normal((777, 9)).astype(np.float32)
    y = rng.integers(0, 7, 777)
    kw: dict[str, object] = {}
    if layout == "userblock":
        kw["userblock_size"] = 1024
    elif layout == "chunked-gzip":
        kw.update(chunks=(64, 9), compression="gzip")
    elif layout == "y-big-endian":
        y = y.astype(">i4")
    elif layout == "y-float64":
        y = y.astype(np.float64)
    if layout == "chunked-gzip":   # y is 1-D: its own chunk shape
        with h5py.File(tmp_path / "d.h5", "w") as f:
            f.create_dataset("X", data=X, chunks=(64, 9), compression="gzip")
            f.create_dataset("y", data=y, chunks=(64,), compression="gzip")
        path = tmp_path / "d.h5"
    else:
        path = _write(tmp_path / "d.h5", X, y, **kw)
    fast, slow = RankReader(path), RankReader(path, direct=False)
    assert fast.direct == (layout in ("contiguous", "userblock", "y-float64")), layout
    assert not slow.direct
    order = SampleOrder(777, 100, seed=2, block_rows=8)
    for step in range(0, 25):   # 25 * 100 > 3 epochs: batches straddle epoch boundaries
        for r in range(3):
            ranges = order.ranges(*order.share(step, r, 3))
            (xa, ya, fa), (xb, yb, fb) = fast.read(ranges), slow.read(ranges)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
            assert fa == fb
            assert ya.dtype == np.float32 and xa.shape == (sum(hi - lo for lo, hi in ranges), 9)
    rows = [i for lo, hi in sorted(order.ranges(0, 100)) for i in range(lo, hi)]
    np.testing.assert_array_equal(fast.read(order.ranges(0, 100))[0], X[rows])
    fast.close()
    slow.close()
