"""Linear and logistic-regression gradient kernels: fused passes over float32 X, one thread.

The raw kernels behind ``kernels.cpu.linear_grad`` / ``logistic_grad`` (which check the
arguments and pick the one- or many-thread driver); conventions as in ``kernels.cpu``.
Also the fixed row chunking that the softmax kernels in ``kernels.cpu`` share.

Each chunk of rows runs in blocks of _BLOCK rows, X read from memory once a block:
1. the logits, x . w + b for the block's rows (two rows a pass: ``_dot2``; in float32
   compute where X fits in L2, eight rows a pass in explicit SIMD: ``simd.dot_rows8``);
2. the residuals and losses, a loop over the block (the logistic's: SIMD, with exp and
   log1p from ``kernels.vmath``);
3. the gradient, the block's rows times their residuals added into g while the rows are
   in L1 (``simd.add_rows``: g's columns held in registers as the rows stream past).
From DRAM the kernels prefetch rows ahead into L2 as fast as they read them (_PF_ROWS).

Float32 linear with d a multiple of 16 up to 128 (``simd.linear_rows_fit``) takes one pass
a row instead (``simd.linear_rows``): the row's vectors are loaded once and stay in
registers for both its logit and its gradient FMAs (w and the block's float32 gradient
stay in registers too: 24 of AVX-512's 32), its residual needing only an add. So X is
read once, in address order, with no second pass from L1: in L2 the loads and FMAs of one
row overlap the next row's, and from DRAM the hardware prefetcher follows the one stream
without help (no software prefetch). The blocks (_BLOCK rows of float32 gradient added
into the float64 g) and chunks are as before; the logit's sum order is the instruction's
(two FMA chains, even and odd vectors, then a halving tree over the lanes). Measured (one
thread, of the bench's read loop in the same run; ``python bench/bench_kernels.py
--gradients-only``): at 1536 x 128, 0.36-0.40 -> 0.44-0.45 through ``cpu.linear_grad``, whose
argument checks are 3-6 us of its 15 us call (the chunk alone: 14.7-15.0 us, about 0.55);
at 200k x 128, 0.75-0.94 over nine runs of the three-pass kernel that day -> 0.88-0.89
(aligned X) and 0.95-0.96 (numpy-placed), two runs. The logistic needs exp and log1p per row,
which run as SIMD over a block's rows (``vmath.logistic_rows32``), so it keeps the
three-pass blocks.
The order of every sum is fixed by the code (blocks, row order, chunk order), never by
the thread count; only ``_dot2``'s vectorised reduction follows the node's vector width.

Float64 compute converts each element of X twice (vcvtps2pd: once for its logit, once
for its gradient), which is what its kernels spend their time on: converting alone (with
an FMA by a constant) ran at 1.8x the bench's read loop per element. Float32 compute
(``model.compute: float32``) never converts X: w is cast to float32 once a call, logits
and the block gradient are float32 FMAs, the linear residual float64, the logistic's
sigmoid, residual and row losses float32 (``vmath.logistic_rows32``: 1.8x the float64
residual block's rate), and the block gradient is added into the float64 g once a block;
the loss and the bias's gradient sum in float64 (~1e-6 relative per entry in all).

Measured (python bench/bench_kernels.py --threads 1 --gradients-only, three runs each,
interleaved with the kernels of commit 5757d17 on a quiet 2-core Zen 4 box; GB/s of X,
"of the read" over the bench's read loop in the same run, 28-29 GB/s from DRAM):
- 200k x 128: float32 linear 12-19 -> 25.4-25.9 (0.42-0.67 -> 0.88-0.90 of the read),
  float32 logistic 10-16 -> 23-24 (0.35-0.57 -> 0.82-0.84), float64 linear 16.5-20 ->
  20.5-21 (-> 0.71-0.75), float64 logistic 15.4-16.2 -> 17.4-17.8 (-> 0.60-0.62);
- 1536 x 128 (in L2): float32 linear 26-30 -> 30-37, float32 logistic 22-24 -> 28-34,
  float64 unchanged (18-22): it is bound by the conversions above.
What each step gave: the prefetch (from DRAM 1.2-1.45x), ``add_rows`` (1.6x on the
gradient pass), ``dot_rows8`` (1.4x on the logits in L2), the float32 residual (1.25x on
the float32 logistic).
Tried and measured no better, so not done:
- ``dot_rows8`` from DRAM, where the old two-row pass with the prefetch ran faster (20-24
  against 26-28 GB/s; rows read eight at a time or one after the other, with or without a
  prefetch spread over its rows); ``add_rows`` over a whole block from DRAM (one prefetch
  burst a block: 0.6x);
- a merged pass (the next rows' logits with these rows' gradient), in numba and in
  vector IR: as fast in L2, 0.6x from DRAM; a one-row logit pass (alone it streams from
  DRAM at the read rate, between the gradient passes at 13-17 GB/s); four or eight rows
  per ``_dot2`` pass; prefetching into L1 as well as L2; 32 to 256 rows ahead (the same).
  From DRAM the data decide, not the instruction counts: the hardware prefetcher follows
  ``_dot2``'s two interleaved rows and the software prefetch fills the gaps;
- for the logistic: computing a block's residuals one block ahead of the previous
  block's gradient (software pipelining: 0.458 against 0.463); constant 8- or 16-row
  residual loops; FMA contraction in vmath's polynomials (1.12x on the residual alone,
  ~2% on the kernel, and results further from libm's);
- for float64: converting each block once into an L1 float64 buffer (the convert-and-
  store pass alone took 0.87 of the read loop's time: 64-byte stores).
- for the float32 logistic, one read of each row as the float32 linear does, in vector IR
  with exp and the sigmoid repeated op for op from vmath (the residuals came out bit for
  bit the same), three ways; each against this kernel back to back (``python
  bench/bench_kernels.py --threads 1 --gradients-only``, 200k x 128 of the read / 1536 x
  128 in GB/s):
  - the residual per row, scalar, the row kept in registers for its gradient FMAs: 0.66-
    0.67 against 0.71-0.79 / 18.9 against 32.5. A row's residual is a long chain of
    dependent operations (the exp's polynomial, a divide), and the core overlaps too few
    rows' chains to hide it (my reading of the figures, not a counter measurement);
  - 16 rows' logits (a transpose tree into one vector), one SIMD residual for the 16,
    then their FMAs from L1: 0.39-0.44, 0.45-0.51 with rows 64 ahead prefetched, against
    0.76-0.88 / 29-31 against 33.5;
  - the same, pipelined: each row's logit read in one stream while the previous group's
    row (16 rows back, in L1) is added into g, in calls of 256 rows: 0.41-0.46, 0.59-0.65
    with the prefetch, against 0.76-0.84 / 33.1 against 33.1.
  From DRAM the three-pass blocks and their prefetch stay ahead: the residual has to be
  SIMD over rows, and then the rows must be read twice.
- for the float32 logistic, later (kernels in one process against this one, interleaved,
  a median over 4-6 processes each; between processes this VM's DRAM figures move by
  +-5%, so only the in-process ratio says anything):
  - each block's gradient pass one block behind its residuals, so the core runs it while
    the residuals' chain completes (16-row blocks, two in L1): from DRAM 1.05x in one set
    of 6 processes, 1.005x in the next 5; in L2 0.82x;
  - the rows' losses and residuals added into one float64 sum per row slot, summed once
    a chunk (no chain of 32 dependent adds a block): from DRAM 1.01x, in L2 0.95x.
  - in L2, blocks of 64 to 512 rows (one block a chunk at 512), so that a residual pass
    has more independent rows: 0.38-0.41 of the read against 0.40 for 32 rows.
  The current kernel over the same day: 0.74-0.91 of the read, median 0.81, in 8 runs of
  ``bench_kernels.py --gradients-only``; 0.85 in that day's ``make bench``.
- for the float32 logistic from DRAM, later still (same method, 4-5 processes each):
  - what the gap to the linear kernel is made of: the residual replaced by z - y (no exp,
    no log1p) ran 1.03x, the log1p alone dropped 1.00x. So the logistic's math costs ~3%;
    the rest is the three passes (the linear's one-pass kernel ran 1.09x the logistic in
    the same processes). In L1 (32 rows repeated): ``_dot2`` 4.9 ns a row, ``dot_rows8``
    3.9, the float32 residual 1.6, ``add_rows`` 2.8 (about the FMA peak), ``linear_rows``
    8.2; from DRAM a row takes 17.7 ns at the read rate.
  - the logits one row at a time in address order (a row's vectors in registers, as
    ``linear_rows`` reads them), with the same prefetch: 0.90x;
  - super-blocks of 128 or 256 rows (in L2): their logits streamed one row at a time for
    the hardware prefetcher, then their residuals, then their gradient from L2 while the
    next super-block's first rows are prefetched (2 or 4 rows per 8): 0.71-0.85x;
  - the prefetch as prefetcht2: 0.98x; as prefetchnta: 0.49x.
  - two rows' logits in vector IR (four FMA chains, w loaded once a pair, one reduction
    tree for both rows): 3.8 against 4.2 ns a row in L1, but 0.93x from DRAM. (``_dot2``
    with numba's inline="always" ran at 45 ns a row: inlined, its fastmath flags no longer
    let LLVM vectorise the sums.)
  The current kernel in those processes: a median of 0.79-0.82 of the read.
- why one stream loses from DRAM (the float32 logistic, one loop in vector IR: each row's
  logit read in address order as ``linear_rows`` reads it, while the previous 32-row
  block's rows, in L1, get their gradient FMAs with the residuals computed between
  blocks; three processes, of the read against this kernel's 0.78-0.88 in the same
  processes): the loop ran 0.57-0.61, though in L2 it beat this kernel (12.6 against 15.8
  ns a row). Taken apart: its logits alone 0.80-0.88; with the gradient FMAs on rows
  reloaded from L1 0.62-0.64 (a plain z - y residual) and 0.59 with the same 32 rows
  reloaded every block (always in L1); with the FMAs on the row already in registers
  (wrong rows' residuals, as a probe) 0.86-0.90. So the eight reloads a row cost the
  stream its overlap, not the residual's math nor the reloaded rows' addresses. The
  rows 64 rows ahead prefetched into L2 from the loop made it 0.54-0.59. My reading
  (no counters on this VM): the core's load window holds fewer rows of the stream when a
  row brings eight more loads, and software prefetches do not make up for it here.
Where X starts matters too (kernels.memory): in L2, rows on a 64-byte boundary (as the
engine's reader holds a batch) ran 1.2x rows 16 bytes past one (numpy's placement of a
large array), because every 64-byte load then touches one cache line, not two. From DRAM
the sign changed between runs on the bench VM (kernels.memory has the figures); the
bench shows both placements. The results are the same bits either way.
At L2 size the roofline bound is the FMA peak, not the read (bench_kernels' of_bound):
0.85 of the read there would need ~0.9 of the float32 FMA peak, and 1.85x the float64 one.
And any kernel that reads a row twice stays under half the read there: the logits pass
alone (``dot_rows8`` over 1536 x 128) ran at 90 GB/s against the read loop's ~100.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import simd, vmath
from kernels.prefetch import prefetch_rows

# Row chunks: a FIXED count that depends only on n, never on the thread count. Each chunk
# sums its rows into its own partial gradient and the partials are added in chunk order,
# so one thread and many threads give bit-identical results (the threaded drivers only
# run the same chunks concurrently).
_CHUNKS = 16
_CHUNK_MIN_ROWS = 512

# Rows per residual / gradient block: enough for a SIMD loop over the block's exp/log1p,
# few enough that the block's rows (16 KiB at d = 128) stay in L1 between the logit pass
# and the gradient pass. The residual block is latency-bound (kernels.vmath) and 32 rows
# run four of its 8-row vectors side by side, not two. Against 16 (one thread, 1536 x 128,
# interleaved, load 2.3): logistic 1.03x, float32 logistic 1.11x, float32 linear 1.06x (a
# float32 block's gradient is added into g once per 32 rows). From DRAM 16 rows won while
# the hardware prefetcher alone fed the kernels; with the kernels' own prefetch (below) 32
# rows win there too (200k x 128, one thread, of the read rate, 16 / 32 rows: float32
# linear 0.87-0.88 / 0.88-0.90, float32 logistic 0.69-0.70 / 0.72-0.73, float64 logistic
# 0.60 / 0.63).
_BLOCK = 32

# Software prefetch where X does not fit in one core's L2 (Zen 4: 1 MiB). Each pass over d
# (two rows' logits, or eight rows' gradient) first asks L2 for rows _PF_ROWS ahead of the
# demand stream: one row per logit pass and four per gradient pass, which is a block's
# rows per block, spread over the block's arithmetic. Without it the memory sat idle while
# a block computed: the hardware prefetcher runs ahead only of demand misses, and the
# gradient and residual passes make none (their rows are in L1), so a block's fetch and
# its arithmetic took turns. Measured (200k x 128 float32, one thread, best of 7 runs
# interleaved with the kernels before, of the flat float32 read in the same run): float32
# linear 0.59-0.70 -> 0.87-0.90, float32 logistic 0.51-0.59 -> 0.72-0.74, float64 linear
# 0.65 -> 0.77, float64 logistic 0.55 -> 0.63. Prefetching into L1 instead (prefetcht0)
# made it worse (0.42-0.44: the L1's miss buffers fill), as did all of a block's rows
# asked for during its logit pass alone (0.57) or in bursts before each pass (0.62-0.65),
# and earlier, rows asked for one per gradient pass only, fewer than the kernel reads (no
# better). 32 and 64 rows ahead measured the same; where X fits in L2 the prefetch costs
# 3-7% and is not issued. The distance and the switch depend on X's size only.
_PF_ROWS = 64
_CACHED_BYTES = 1 << 20


@njit(cache=True, nogil=True)
def _prefetches(X: np.ndarray) -> bool:
    """Return True where X does not fit in one core's L2, so the kernels prefetch its rows."""
    return X.shape[0] * X.shape[1] * X.itemsize > _CACHED_BYTES


@njit(cache=True, nogil=True)
def _first_prefetch(X: np.ndarray, lo: int, pf: bool) -> int:
    """Return the first row to prefetch for a chunk from lo: X's end (none) if not pf."""
    return lo + _PF_ROWS if pf else X.shape[0]


@njit(cache=True, nogil=True)
def _n_chunks(n: int) -> int:
    """Return the number of row chunks for n rows (1..16, independent of threads)."""
    return max(1, min(_CHUNKS, n // _CHUNK_MIN_ROWS))


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _dot2(x0: np.ndarray, x1: np.ndarray, w: np.ndarray, d: int,
          zero: float | np.float32) -> tuple[float | np.float32, float | np.float32]:
    """Return (x0 . w, x1 . w) over j < d in zero's type (order: LLVM's vector reduction)."""
    # Two rows per pass: w is loaded once for both, and two rows' cache lines are in
    # flight at once (both rows are adjacent in X: one stream to the prefetcher). One FMA
    # per element ("contract"; 1.1x the mul + add's rate at L2 size). Reassociation lets
    # LLVM vectorise the reduction, so the order follows the node's vector width: results
    # may differ in the last bits between AVX2 and AVX-512 nodes, never between slots,
    # calls or thread counts. Sync kind 'exact' does not use these kernels.
    # zero is 0.0 (float64 sums of float32 x times float64 w) or np.float32(0) with a
    # float32 w (the float32 kernels: float32 FMAs, x never converted).
    s0 = zero
    s1 = zero
    for j in range(d):
        wj = w[j]
        s0 += x0[j] * wj
        s1 += x1[j] * wj
    return s0, s1


@njit(cache=True, nogil=True, inline="always")
def _add_block(g: np.ndarray, X: np.ndarray, i: int, r: np.ndarray, m: int, pf: bool,
               nxt: int) -> int:
    """Add rows i..i+m of X times r[:m] to g; return the next row to prefetch.

    With pf (X from DRAM), eight rows a call and half as many rows prefetched before each
    (with the logit pass's one row per two, the block's rows per block); else one call.
    """
    step = 8 if pf else m
    t = 0
    while t < m:
        u = min(step, m - t)
        prefetch_rows(X, nxt, nxt + u // 2, True)   # none without pf (nxt is X's end)
        nxt += u // 2
        simd.add_rows(g, X, i + t, r, t, u)
        t += u
    return nxt


@njit(cache=True, nogil=True, inline="always")
def _logits2(X: np.ndarray, i: int, t: int, m: int, w: np.ndarray, z: np.ndarray,
             zero: float | np.float32, nxt: int) -> int:
    """Set z[t:m] to the dot products of rows i+t..i+m with w, in zero's type; return nxt.

    Two rows a pass (``_dot2``), one row prefetched (from nxt) before each; an odd last row
    is paired with itself, so it is summed as any other row.
    """
    d = X.shape[1]
    while t < m:
        prefetch_rows(X, nxt, nxt + 1, True)   # none without pf (nxt is X's end)
        nxt += 1
        s0, s1 = _dot2(X[i + t], X[i + min(t + 1, m - 1)], w, d, zero)
        z[t] = s0
        if t + 1 < m:
            z[t + 1] = s1
        t += 2
    return nxt


@njit(cache=True, nogil=True)
def _glm_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
               g: np.ndarray, logistic: bool, blk: int, pf: bool) -> float:
    """Add rows lo..hi's gradient to g (d+1,) (zeroed here), float64 compute; return the loss."""
    d = X.shape[1]
    g[:] = 0.0
    b = float(w[d])
    wd = w[:d]
    z = np.empty(blk)
    yb = np.empty(blk)
    rb = np.empty(blk)
    lb = np.empty(blk)
    loss = 0.0
    gb = 0.0
    nxt = _first_prefetch(X, lo, pf)
    i = lo
    while i < hi:
        m = min(blk, hi - i)
        nxt = _logits2(X, i, 0, m, wd, z, 0.0, nxt)
        if logistic:
            for t in range(m):
                z[t] += b
                yb[t] = y[i + t]
            loss += vmath.logistic_rows(z, yb, rb, lb, m)
            for t in range(m):
                gb += rb[t]
        else:
            for t in range(m):
                rt = (z[t] + b) - y[i + t]
                loss += 0.5 * rt * rt
                gb += rt
                rb[t] = rt
        nxt = _add_block(g, X, i, rb, m, pf, nxt)
        i += m
    g[d] = gb
    return loss


@njit(cache=True, nogil=True)
def _glm32_chunk(X: np.ndarray, y: np.ndarray, w32: np.ndarray, b: float, lo: int, hi: int,
                 g: np.ndarray, logistic: bool, blk: int, pf: bool) -> float:
    """Add rows lo..hi's gradient to g (d+1,) (zeroed here), products in float32; return the loss."""
    d = X.shape[1]
    g[:] = 0.0
    g32 = np.empty(d, dtype=np.float32)
    z32 = np.empty(blk, dtype=np.float32)
    r32 = np.empty(blk, dtype=np.float32)
    l32 = np.empty(blk, dtype=np.float32)
    loss = 0.0
    gb = 0.0
    if not logistic and simd.linear_rows_fit(d):   # one pass a row, the row in registers (header)
        sums = np.zeros(2)
        for i in range(lo, hi, blk):
            m = min(blk, hi - i)
            simd.linear_rows(g32, X, i, m, w32, y, b, sums)
            for j in range(d):
                g[j] += float(g32[j])
        g[d] = sums[1]
        return sums[0]
    nxt = _first_prefetch(X, lo, pf)
    i = lo
    while i < hi:
        m = min(blk, hi - i)
        t = 0
        if not pf:   # X in L2: eight rows a pass (from DRAM _dot2 was faster; header)
            while t + 8 <= m:
                simd.dot_rows8(X, i + t, w32, z32, t)
                t += 8
        nxt = _logits2(X, i, t, m, w32, z32, np.float32(0.0), nxt)
        if logistic:   # residual and loss in float32 too (vmath.logistic_rows32)
            for t in range(m):
                z32[t] = float(z32[t]) + b
            loss += vmath.logistic_rows32(z32, y[i:i + m], r32, l32, m)
            for t in range(m):
                gb += float(r32[t])
        else:
            for t in range(m):
                rt = (float(z32[t]) + b) - y[i + t]
                loss += 0.5 * rt * rt
                gb += rt
                r32[t] = rt
        g32[:] = 0.0
        nxt = _add_block(g32, X, i, r32, m, pf, nxt)
        for j in range(d):
            g[j] += float(g32[j])
        i += m
    g[d] = gb
    return loss


@njit(cache=True, nogil=True)
def _chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, w32: np.ndarray, lo: int, hi: int,
           g: np.ndarray, logistic: bool, f32: bool, pf: bool) -> float:
    """Run chunk lo..hi in the compute precision: float32 products if f32, else float64."""
    if f32:
        return _glm32_chunk(X, y, w32, float(w[X.shape[1]]), lo, hi, g, logistic, _BLOCK, pf)
    return _glm_chunk(X, y, w, lo, hi, g, logistic, _BLOCK, pf)


@njit(cache=True, fastmath=False, nogil=True)
def _combine(parts: np.ndarray, losses: np.ndarray, g: np.ndarray) -> float:
    """Set g to the sum of parts' rows in row order; return losses summed in order."""
    g[:] = parts[0]
    loss = losses[0]
    for c in range(1, parts.shape[0]):
        p = parts[c]
        for j in range(g.shape[0]):
            g[j] += p[j]
        loss += losses[c]
    return loss


@njit(cache=True, nogil=True)
def _glm_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray, logistic: bool,
              f32: bool) -> float:
    """Fill g (d+1,) with the summed gradient over fixed row chunks on one thread."""
    n, d = X.shape
    w32 = w[:d].astype(np.float32) if f32 else np.empty(0, np.float32)
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in range(nc):
        losses[c] = _chunk(X, y, w, w32, n * c // nc, n * (c + 1) // nc, parts[c], logistic, f32, pf)
    return _combine(parts, losses, g)


@njit(cache=True, nogil=True, parallel=True)
def _glm_grad_threads(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray,
                      logistic: bool, f32: bool) -> float:
    """Same chunks and result as ``_glm_grad``, the chunks spread over numba's threads."""
    n, d = X.shape
    w32 = w[:d].astype(np.float32) if f32 else np.empty(0, np.float32)
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in prange(nc):
        losses[c] = _chunk(X, y, w, w32, n * c // nc, n * (c + 1) // nc, parts[c], logistic, f32, pf)
    return _combine(parts, losses, g)
