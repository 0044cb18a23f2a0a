"""The batch copy kernels (kernels.gather) and the reader's choice between them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.engine.data import GATHER_THREADS_MIN_ROWS, RankReader
from kernels import gather

ROOT = Path(__file__).resolve().parents[2]


def _ranges(rng: np.random.Generator, n: int, count: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted row ranges (lo, hi) inside [0, n), some adjacent, one repeated (an epoch boundary)."""
    lo = np.sort(rng.choice(n - width, count, replace=False)).astype(np.int64)
    hi = lo + rng.integers(1, width + 1, count)
    lo = np.append(lo, lo[0])   # a row range read twice: the second layer of a batch across epochs
    hi = np.append(hi, hi[0])
    return lo, hi


@pytest.mark.parametrize("d", [1, 3, 20, 128, 130])
@pytest.mark.parametrize("ydtype", [np.float32, np.float64, np.int64, np.int32])
def test_copies_the_rows_in_order(d: int, ydtype: type) -> None:
    rng = np.random.default_rng(d)
    n = 3000
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 9, n).astype(ydtype) if np.dtype(ydtype).kind == "i" else rng.standard_normal(n).astype(ydtype)
    X.flags.writeable = False   # as the reader's memory map
    y.flags.writeable = False
    lo, hi = _ranges(rng, n, 40, 70)
    want_x = np.concatenate([X[a:b] for a, b in zip(lo, hi)])
    want_y = np.concatenate([y[a:b] for a, b in zip(lo, hi)]).astype(np.float32)
    m = want_x.shape[0]
    runs = [lambda ox, oy: gather.gather_rows(X, y, lo, hi, ox, oy)]
    runs += [lambda ox, oy, p=p: gather.gather_rows_threads(X, y, lo, hi, ox, oy, p) for p in (1, 2, 3, 7)]
    for run in runs:
        out_x = np.full((m + 5, d), -7.0, np.float32)
        out_y = np.full(m + 5, -7.0, np.float32)
        run(out_x, out_y)
        np.testing.assert_array_equal(out_x[:m], want_x)
        np.testing.assert_array_equal(out_y[:m], want_y)
        assert (out_x[m:] == -7.0).all() and (out_y[m:] == -7.0).all()   # nothing past the batch


def _file(tmp_path: Path, n: int, d: int) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = X, y
    return path, X, y


def test_reader_threaded_copy_gives_the_same_batch(tmp_path: Path) -> None:
    path, X, y = _file(tmp_path, 5000, 24)
    ranges = [(4000, 4032), (96, 128), (1000, 1700), (2500, 2532), (3000, 3900)]
    want = np.concatenate([X[a:b] for a, b in sorted(ranges)])
    reader = RankReader(path)
    assert reader.direct
    batches = []
    for threads in (False, True, None):
        xb, yb, fp = reader.read(ranges, threads=threads)
        np.testing.assert_array_equal(xb, want)
        np.testing.assert_array_equal(yb, np.concatenate([y[a:b] for a, b in sorted(ranges)]).astype(np.float32))
        batches.append((xb.copy(), fp))
    reader.close()
    assert all(b[0].tobytes() == batches[0][0].tobytes() and b[1] == batches[0][1] for b in batches)


# numba fixes its thread count at import: the reader's own choice of the threaded copy is
# checked in a child started with two threads, as a phase with threads_per_rank 2 starts.
_CHILD = r"""
import sys
import numpy as np
from kernels import gather
from fleetmpi.engine.data import GATHER_THREADS_MIN_ROWS, RankReader
calls = []
real = gather.gather_rows_threads
gather.gather_rows_threads = lambda *a: (calls.append(a[-1]), real(*a))
reader = RankReader(sys.argv[1])
rows = GATHER_THREADS_MIN_ROWS
xb, _, _ = reader.read([(0, rows // 2), (rows, rows + rows // 2)])
np.save(sys.argv[2], xb)
reader.read([(0, 10)])   # below the threshold: one thread
print(calls)
"""


def test_reader_copies_on_the_phase_threads(tmp_path: Path) -> None:
    path, X, _ = _file(tmp_path, 3 * GATHER_THREADS_MIN_ROWS, 16)
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "xb.npy"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[2]"   # one threaded copy, in two parts; the small read was not
    half = GATHER_THREADS_MIN_ROWS // 2
    np.testing.assert_array_equal(np.load(out), np.concatenate([X[:half], X[2 * half:3 * half]]))


def test_span_rows_counts_the_rows_or_refuses_a_range_outside_the_file() -> None:
    # The readers' one-pass check (h5rows.check_ranges): the rows a batch holds, or -1 where
    # numpy would refuse the ranges; random ranges, some made bad.
    rng = np.random.default_rng(5)
    n = 1000
    for trial in range(300):
        lo, hi = _ranges(rng, n, int(rng.integers(1, 12)), 40)
        if trial % 3 == 1:   # one range past the end, below 0, or reversed
            k = int(rng.integers(lo.size))
            how = trial % 9
            if how < 3:
                hi[k] = n + int(rng.integers(1, 50))
            elif how < 6:
                lo[k] = -int(rng.integers(1, 50))
            else:
                lo[k], hi[k] = hi[k] + 1, lo[k]
        bad = bool((lo < 0).any() or (hi > n).any() or (hi < lo).any())
        want = -1 if bad else int(np.sum(hi - lo))
        assert gather.span_rows(lo, hi, n) == want, (lo, hi)
    assert gather.span_rows(np.array([0], np.int64), np.array([n], np.int64), n) == n   # the whole file
    assert gather.span_rows(np.empty(0, np.int64), np.empty(0, np.int64), n) == 0


def test_gather_batch_orders_checks_copies_and_fingerprints_in_one_call() -> None:
    # The reader's one-thread read (kernels.gather.gather_batch) against its four steps run
    # apart: file_order, span_rows, gather_rows and the fingerprint of h5rows; random ranges
    # in any order, with the repeats of a batch across an epoch boundary.
    from fleetmpi.engine.h5rows import FP_MASK, FP_MULT
    rng = np.random.default_rng(8)
    n, d = 2000, 20
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 5, n).astype(np.int64)
    for _ in range(40):
        lo, hi = _ranges(rng, n, int(rng.integers(1, 30)), 50)
        b = np.stack([lo, hi], axis=1)[rng.permutation(lo.size)].copy()
        slo, shi, _ = gather.file_order(b)
        m = int(gather.span_rows(slo, shi, n))
        want_x, want_y = np.empty((m, d), np.float32), np.empty(m, np.float32)
        gather.gather_rows(X, y, slo, shi, want_x, want_y)
        out_x = np.full((m + 3, d), -7.0, np.float32)
        out_y = np.full(m + 3, -7.0, np.float32)
        status, rows, olo, ohi, fp = gather.gather_batch(X, y, b, out_x, out_y, FP_MULT, FP_MASK)
        assert (status, rows) == (0, m)
        assert np.array_equal(olo, slo) and np.array_equal(ohi, shi)
        np.testing.assert_array_equal(out_x[:m], want_x)
        np.testing.assert_array_equal(out_y[:m], want_y)
        assert (out_x[m:] == -7.0).all() and (out_y[m:] == -7.0).all()
        rows = np.concatenate([np.arange(a, c, dtype=np.uint64) for a, c in zip(slo, shi)])
        assert int(fp) == int(((rows * FP_MULT) & FP_MASK).sum()) > 0   # numpy's sum of the same hash
        # A buffer one row short, or a range past the file's end: status only, nothing written.
        short_x, short_y = np.full((m - 1, d), -7.0, np.float32), np.full(m - 1, -7.0, np.float32)
        assert gather.gather_batch(X, y, b, short_x, short_y, FP_MULT, FP_MASK)[:2] == (2, m)
        assert (short_x == -7.0).all() and (short_y == -7.0).all()
        bad = b.copy()
        bad[int(rng.integers(b.shape[0])), 1] = n + 1
        assert gather.gather_batch(X, y, bad, out_x, out_y, FP_MULT, FP_MASK)[:2] == (1, -1)
