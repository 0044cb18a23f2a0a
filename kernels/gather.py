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

CSR rows (``csr_sizes``, ``gather_csr``): one pass over the batch's rows copies their offsets
and labels and each range's ids and values, checking the file's offsets and ids as it goes,
into buffers the reader keeps; 4096-row batches of ~200k entries: 0.55-0.66 ms, against
1.3 ms for numpy slicing each range and concatenating and 1.7-1.8 ms for the reader's old
per-range loop (bench_kernels' CSR table). The batch's ranges themselves (``visit_blocks``,
``sort_ranges``, ``file_order``) are worked out here too: a few us a batch, where the numpy
and Python they replaced took ~60 us at 128 ranges.
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


@njit(cache=True, nogil=True)
def csr_sizes(indptr: np.ndarray, nz: int, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, bool]:
    """Return (rows, entries, sound) of CSR rows [lo[k], hi[k]): sound where each range's
    offsets lie within [0, nz] and do not run backwards (else the counts are meaningless).
    Rows [lo, hi) must lie within the file's n rows (indptr has n + 1 offsets)."""
    rows = 0
    nnz = 0
    for k in range(lo.size):
        a, b = indptr[lo[k]], indptr[hi[k]]
        if a < 0 or b < a or b > nz:
            return 0, 0, False
        rows += hi[k] - lo[k]
        nnz += b - a
    return rows, nnz, True


@njit(cache=True, nogil=True)
def gather_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, y: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, d: int, ip: np.ndarray, ix: np.ndarray,
               dv: np.ndarray, yy: np.ndarray) -> bool:
    """Copy CSR rows [lo[k], hi[k]), k in order, into ip (rows + 1, offsets from 0), ix, dv
    (entries) and yy (rows), sized by ``csr_sizes`` of a sound file; return whether the rows
    were sound: offsets that never decrease and column ids in [0, d) (a file changed after
    its checks must not send a kernel outside the model; nothing is read or written out of
    bounds either way, if ip, ix, dv and yy are at least that long). No Python per range.

    The outputs come from the caller (numpy's allocator reuses the last batch's freed
    pages; numba's took fresh ones, whose first touch cost 0.6 ms a batch of 200k entries).
    """
    bad = 0
    lowest, highest = 0, 0
    ip[0] = 0
    r = 0
    off = 0
    for k in range(lo.size):
        a, b = indptr[lo[k]], indptr[hi[k]]
        # Again, against these outputs: the file may have changed since csr_sizes.
        if a < 0 or b < a or b > indices.shape[0] or off + b - a > ix.shape[0] or r + hi[k] - lo[k] > yy.shape[0]:
            return False
        for i in range(lo[k], hi[k]):
            p = indptr[i + 1]
            bad += (p < indptr[i]) | (p > b)
            ip[r + 1] = off + (min(max(p, a), b) - a)
            yy[r] = np.float32(y[i])
            r += 1
        # Straight copies and a min / max (no branch a column: LLVM vectorises all three).
        ix[off:off + b - a] = indices[a:b]
        dv[off:off + b - a] = data[a:b]
        for t in range(off, off + b - a):
            lowest = min(lowest, ix[t])
            highest = max(highest, ix[t])
        off += b - a
    return bad == 0 and lowest >= 0 and highest < d


@njit(cache=True, nogil=True)
def span_rows(lo: np.ndarray, hi: np.ndarray, n: int) -> int:
    """Return how many rows the ranges [lo[k], hi[k]) hold together, or -1 if one of them is
    not within a file of n rows (the reader then says which). One pass; numpy's three
    reductions and a sum took 7 us a batch."""
    total = 0
    for k in range(lo.size):
        if lo[k] < 0 or hi[k] > n or hi[k] < lo[k]:
            return -1
        total += hi[k] - lo[k]
    return total


@njit(cache=True, nogil=True)
def visit_blocks(starts: np.ndarray, cum: np.ndarray, off: int, end: int) -> np.ndarray:
    """Return the (k, 2) file row ranges of epoch offsets [off, end) (off < end), in visiting order.

    Block b of the epoch's order holds file rows starts[b] .. starts[b] + cum[b+1] - cum[b]
    at offsets cum[b] .. cum[b+1]; a block that continues the previous one in the file
    extends its range.
    """
    b0 = np.searchsorted(cum, off, side="right") - 1
    b1 = np.searchsorted(cum, end - 1, side="right") - 1
    out = np.empty((b1 - b0 + 1, 2), np.int64)
    k = 0
    for b in range(b0, b1 + 1):
        lo = starts[b] + (off - cum[b] if b == b0 else 0)
        hi = starts[b] + (end - cum[b] if b == b1 else cum[b + 1] - cum[b])
        if k > 0 and out[k - 1, 1] == lo:
            out[k - 1, 1] = hi
        else:
            out[k, 0] = lo
            out[k, 1] = hi
            k += 1
    return out[:k]


@njit(cache=True, nogil=True)
def sort_ranges(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (lo, hi): the ranges of b (k, 2) sorted by (lo, hi)."""
    order = np.argsort(b[:, 1], kind="mergesort")
    order = order[np.argsort(b[order, 0], kind="mergesort")]
    return b[order, 0].copy(), b[order, 1].copy()


@njit(cache=True, nogil=True)
def file_order(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (lo, hi, cuts): the ranges of b (k, 2) in the order a reader copies them.

    Sorted by (lo, hi), then split into layers without overlaps (an HDF5 union selection
    would merge overlapping ranges): each range joins the first layer whose last range
    ends at or before its start. Rows repeat only when a batch spans an epoch boundary,
    so there are one or two layers. Layer L is ranges cuts[L] .. cuts[L+1].
    """
    slo, shi = sort_ranges(b)
    k = slo.size
    layer = np.empty(k, np.int64)
    last = np.empty(k, np.int64)
    nl = 0
    for j in range(k):
        found = -1
        for q in range(nl):
            if last[q] <= slo[j]:
                found = q
                break
        if found < 0:
            found = nl
            nl += 1
        layer[j] = found
        last[found] = shi[j]
    lo_out = np.empty(k, np.int64)
    hi_out = np.empty(k, np.int64)
    cuts = np.zeros(nl + 1, np.int64)
    t = 0
    for q in range(nl):
        for j in range(k):
            if layer[j] == q:
                lo_out[t] = slo[j]
                hi_out[t] = shi[j]
                t += 1
        cuts[q + 1] = t
    return lo_out, hi_out, cuts


@njit(cache=True, nogil=True)
def ranges_fingerprint(lo: np.ndarray, hi: np.ndarray, mult: np.uint64, mask: np.uint64) -> np.uint64:
    """Return the sum of (i * mult) & mask over the rows i of every range [lo[k], hi[k]) (integers, exact)."""
    total = np.uint64(0)
    for k in range(lo.size):
        for i in range(lo[k], hi[k]):
            total += (np.uint64(i) * mult) & mask
    return total


@njit(cache=True, nogil=True)
def gather_batch(X: np.ndarray, y: np.ndarray, b: np.ndarray, out_x: np.ndarray, out_y: np.ndarray,
                 fp_mult: np.uint64, fp_mask: np.uint64) -> tuple[int, int, np.ndarray, np.ndarray, np.uint64]:
    """A one-thread batch read in one call: the ranges b (k, 2) put in file order
    (``file_order``), checked against X's rows (``span_rows``), copied to the front of out_x /
    out_y (``gather_rows``) and fingerprinted (``ranges_fingerprint``). Return (status, rows,
    lo, hi, fingerprint), lo and hi the ranges in file order: status 0 when copied; 1 when a
    range lies outside X (rows -1); 2 when out_x or out_y holds fewer than the batch's rows.
    Nothing is written unless status is 0.

    The engine's reader made four kernel calls for this (order, check, copy, fingerprint),
    each with its dispatch and the Python between them. Measured through the reader (the same
    256 rows of d = 64 at every call, so in cache; one thread, best of 7 x 5000 reads, three
    processes each): 8.1 -> 5.6 us a read; a logistic training step 27.3 -> 24.5 us. A new
    batch at every read, as in training (8 random 32-row blocks from DRAM), takes 8.8-9.7 us
    after, most of it waiting for memory; prefetching the next step's rows while the step
    computes did not shorten the step (all of its lines, every other line, or the first
    lines of each block, into L1 or L2: 25.7-30.2 against 25.0-25.8 us a step).
    """
    lo, hi, _ = file_order(b)
    total = span_rows(lo, hi, X.shape[0])
    if total < 0:
        return 1, total, lo, hi, np.uint64(0)
    if total > out_x.shape[0] or total > out_y.shape[0]:
        return 2, total, lo, hi, np.uint64(0)
    gather_rows(X, y, lo, hi, out_x, out_y)
    return 0, total, lo, hi, ranges_fingerprint(lo, hi, fp_mult, fp_mask)
