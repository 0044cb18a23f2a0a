"""Per-rank HDF5 reads: the rows a rank gets are the rows the sample order names."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.engine.data import RankReader, SampleOrder
from fleetmpi.engine.h5rows import contiguous_share, row_fingerprint
from fleetmpi.errors import BadInput


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
        b = order.bounds(start, stop)   # what the engine passes the reader: the same, as an array
        assert b.dtype == np.int64 and b.shape == (len(got), 2) and b.tolist() == [list(r) for r in got]
    assert order.bounds(3 * batch, 3 * batch).shape == (0, 2)


def _layered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The reader's row order, written plainly: sorted ranges, each into the first layer
    whose last range ends at or before its start, layer after layer."""
    layers: list[list[tuple[int, int]]] = []
    for r in sorted(ranges):
        for layer in layers:
            if layer[-1][1] <= r[0]:
                layer.append(r)
                break
        else:
            layers.append([r])
    return [r for layer in layers for r in layer]


@pytest.mark.parametrize("direct", [True, False])
def test_overlapping_ranges_come_back_in_layer_order_from_a_list_or_an_array(h5file: tuple, direct: bool) -> None:
    # Rows repeat where a batch spans an epoch boundary: such ranges overlap, tie on their
    # start, or nest. The memory-mapped copy and the HDF5 union read give the same rows in
    # the same order, and a list or an int64 array of the ranges the same bits.
    path, X, y = h5file
    reader = RankReader(path, direct=direct)
    assert reader.direct == direct
    rng = np.random.default_rng(21)
    for trial in range(60):
        k = int(rng.integers(1, 12))
        lo = rng.integers(0, 475, k)
        ranges = [(int(a), int(a + rng.integers(1, 24))) for a in lo]   # ends <= 498 of 503 rows
        if trial % 3 == 0:   # a tie on the start, a nested range, an exact repeat, an empty range
            ranges += [(ranges[0][0], ranges[0][1] + 3), ranges[0], (ranges[0][0] + 1, ranges[0][0] + 2),
                       (ranges[0][0], ranges[0][0])]
        want = [i for a, b in _layered(ranges) for i in range(a, b)]
        xa, ya, fa = reader.read(ranges)
        xa, ya = xa.copy(), ya.copy()
        np.testing.assert_array_equal(xa, X[want])
        np.testing.assert_array_equal(ya, y[want].astype(np.float32))
        assert fa == sum(row_fingerprint(i, i + 1) for i in want)
        xb, yb, fb = reader.read(np.array(ranges[::-1], np.int64))   # any order in, file order out
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and fa == fb
    x0, y0, f0 = reader.read([])
    assert x0.shape == (0, 7) and y0.shape == (0,) and f0 == 0.0
    reader.close()


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


@pytest.mark.parametrize("direct", [True, False])
def test_ranges_past_the_files_rows_are_refused_not_read(h5file: tuple, direct: bool) -> None:
    # The sample order comes from rank 0's look at the data: a rank whose copy has fewer rows
    # must stop with BadInput, never read past the end of the memory map.
    path, _, _ = h5file
    reader = RankReader(path, direct=direct)
    for ranges in ([(0, 504)], [(500, 510)], [(10, 20), (0, 10**6)], [(-1, 3)]):
        with pytest.raises(BadInput, match="holds 503 rows"):
            reader.read(ranges)
    reader.read([(0, 503)])   # the whole file is fine
    reader.close()


def test_labels_the_copy_kernel_cannot_take_are_read_through_hdf5(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    y = rng.integers(0, 4, 64).astype(np.float16)
    path = _write(tmp_path / "f16.h5", X, y)
    reader = RankReader(path)
    assert not reader.direct
    xr, yr, _ = reader.read([(3, 9), (40, 50)])
    rows = [*range(3, 9), *range(40, 50)]
    assert np.array_equal(xr, X[rows]) and np.array_equal(yr, y[rows].astype(np.float32))
    reader.close()
