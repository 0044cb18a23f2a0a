"""Copy a batch's rows out of memory-mapped X and y into the reader's buffers.

A batch is a list of row ranges in file order (``block_rows`` rows each where the sample
order shuffles blocks: 32 rows, 16 KiB of float32 X at d = 128). ``gather_rows`` copies them,
one output row after another, and asks L2 for the source row ``_AHEAD_BYTES`` further on
before each copy. The file's pages are the page cache's 4 KiB pages, and the hardware
prefetcher stops at every page boundary, so without the software prefetch each range
began with misses. (The flat float32 read loop of bench_kernels over 200k x 128 ran at
15.7-18.1 GB/s with X on 4 KiB pages, against 30.3-30.5 on 2 MiB pages, in one process.)
``gather_rows_threads`` splits the output rows into
one part per numba thread (the phase's threads_per_rank): a copy, so the bits do not depend
on the split.

Measured (one Zen 4 core unless said; 4096-row batches of 128 float32 columns drawn by the
engine's SampleOrder from a 200k-row make-data file in the page cache; best of 5, ms a
batch): the loop this replaced (a slice copy per range) 0.37-0.39, numpy's concatenate of
the same slices 0.28-0.30, a slice copy per row with the prefetch 0.25-0.27, this loop (the
row's columns copied by an explicit loop, which LLVM vectorises; the prefetch 16 rows
ahead at d = 128) 0.18; on two threads 0.105-0.11 (0.17-0.19 for the old loop split by
range). 8 and 16 rows ahead measured the same. Through the reader (its Python included):
``python bench/bench_kernels.py``'s batch-copy table. End to end (bench_scaling, logistic
200k x 128, batch 4096, one rank) the step went from 0.65 to 0.56 ms; on one rank with two
threads from 0.99 to 0.40 ms.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.prefetch import prefetch_l2

# How far ahead (bytes of source rows) a row is prefetched: 16 rows at d = 128 float32.
_AHEAD_BYTES = 8192


@njit(cache=True, nogil=True)
def _source_rows(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Return the source row of each output row: rows lo[k]..hi[k], k in order."""
    n = 0
    for k in range(lo.size):
        n += hi[k] - lo[k]
    rows = np.empty(n, np.int64)
    o = 0
    for k in range(lo.size):
        for i in range(lo[k], hi[k]):
            rows[o] = i
            o += 1
    return rows


@njit(cache=True, nogil=True, inline="always")
def _copy(X: np.ndarray, y: np.ndarray, rows: np.ndarray, a: int, b: int, out_x: np.ndarray,
          out_y: np.ndarray) -> None:
    """Copy source rows rows[a:b] of X and y to output rows a..b (y -> float32)."""
    d = X.shape[1]
    line = max(1, 64 // X.itemsize)
    ahead = max(1, _AHEAD_BYTES // max(1, d * X.itemsize))
    for j in range(a, b):
        if j + ahead < b:
            p = rows[j + ahead] * d
            for t in range(p, p + d, line):
                prefetch_l2(X, t)
        i = rows[j]
        for c in range(d):
            out_x[j, c] = X[i, c]
        out_y[j] = np.float32(y[i])


@njit(cache=True, nogil=True)
def gather_rows(X: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, out_x: np.ndarray,
                out_y: np.ndarray) -> None:
    """Copy rows [lo[k], hi[k]) of X (n, d) and y (n,), k in order, to the front of out_x / out_y."""
    rows = _source_rows(lo, hi)
    _copy(X, y, rows, 0, rows.size, out_x, out_y)


@njit(cache=True, nogil=True, parallel=True)
def gather_rows_threads(X: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        out_x: np.ndarray, out_y: np.ndarray, parts: int) -> None:
    """``gather_rows`` with the output rows split into ``parts`` (the numba thread count) run
    concurrently. (Passed in: numba.get_num_threads() inside would keep numba from caching
    the kernel.)"""
    rows = _source_rows(lo, hi)
    n = rows.size
    for q in prange(parts):
        _copy(X, y, rows, n * q // parts, n * (q + 1) // parts, out_x, out_y)
