"""Linear and logistic-regression gradient kernels: fused passes over float32 X, one thread.

The raw kernels behind ``kernels.cpu.linear_grad`` / ``logistic_grad`` (which check the
arguments and pick the one- or many-thread driver); conventions as in ``kernels.cpu``.
Also the fixed row chunking that the softmax kernels in ``kernels.cpu`` share.

How they spend their time (Zen 4 core, AVX-512, X 1536 x 128 in L2, one thread): the
float32 -> float64 conversion (vcvtps2pd) is the scarce resource, not the load. Converting
alone (with an FMA by a constant) ran at 1.8x the bench's read loop per element; the dot
product and the gradient update each need x in float64, and a row's gradient needs its
finished dot product, so each element is converted twice, which caps a fused kernel near
0.9 of that read loop. The linear kernel reaches ~0.63 of it, the logistic ~0.45.
What the kernels do to get there:
- the dot products run two rows per pass over w (w loaded once per two rows) with one
  FMA per element ("contract": 1.08-1.10x over multiply-then-add);
- the gradient adds eight rows per pass over g, one chain of FMAs per element, g loaded
  and stored once per eight rows; the rows come back from L1;
- accumulation is float64 throughout, in an order fixed by the code (row pairs, eight-row
  groups, blocks, chunks), never by the thread count.
Tried and measured no better, so not done: converting each block once into an L1 float64
buffer (the convert-and-store pass alone took 0.87 of the read loop's time: 64-byte
stores); four rows per dot pass (0.62 against 0.63); for the logistic, computing a block's
residuals one block ahead of the previous block's gradient (software pipelining, so the
exp/log1p dependency chain overlaps gradient FMAs: 0.458 against 0.463) and residual
blocks of a constant 16 rows padded so the SIMD loop has no scalar remainder (0.450
against 0.449); blocks of 32 rows were faster at L2 size (0.64 against 0.57 on two
threads) but slower from DRAM (see _BLOCK).

Where they stand against the roofline (bench/bench_kernels.py's of_bound: the kernel's
rate over min(read limit, FMA peak of the compute dtype / 1 FLOP per byte of X)): at L2
size the bound is the FMA peak (float64 ~51 GB/s of X, float32 ~96), from DRAM the read
(~31 GB/s). The logistic's residual block (kernels.vmath) is latency-bound: alone, 16
rows took 7.3-8.0 ns a row against 4.0-4.6 for 32 or 64 rows (the vector loop is the
same; only fewer 8-row vectors run side by side). vmath now evaluates its polynomials
mostly by Estrin's scheme (16 rows: 6.2 ns a row; kernels 1.06-1.08x at L2 size, float64
and float32, load 1.3-2.5, interleaved against the old kernel in one process; gradients
within 5e-14 relative of the old ones) and in one loop (a further 1.00-1.05x). The
blocks are 32 rows, so four of the residual's vectors overlap (_BLOCK).
From DRAM the kernels prefetch rows ahead into L2 at the rate they read them, spread over
every pass (_PF_ROWS): 1.2-1.45x. Why that works and what did not is at _PF_ROWS.
Tried earlier and measured no better (one thread, interleaved against the kernel before,
200k x 128 unless said):
- software prefetch of one row per eight-row gradient pass (fewer rows than the kernel
  reads, so it fell behind the demand stream), into L1 0.55-0.94x, into L2 0.77-1.0x;
- the float32 kernel's merged pass (the next eight rows' logits with these eight rows'
  gradient, as described below) with prefetch: 0.83-0.90x (linear) and 0.54x (logistic)
  at L2 size, 0.34-0.38x from DRAM;
- for vmath's residual: loops of a constant 8 or 16 rows instead of m (0.35x and 1.0x
  in isolation: LLVM already runs the m-loop as 8-row vectors); Estrin's scheme for all
  of exp's terms (as fast, but 2 ulps against libm instead of 1);
- float32: flushing the float32 block gradient into g every 32 rows within 16-row
  blocks: 1.05x at L2 size; not taken on its own (the L2-size 32-row blocks do it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import vmath
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


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _glm_add8(g: np.ndarray, X: np.ndarray, i: int, r: np.ndarray, o: int, d: int) -> float:
    """Add rows i..i+8 of X times residuals r[o:o+8] to g[:d]; return the residuals' sum."""
    # One pass over g for eight rows, a tree of FMAs per element: g is loaded and stored
    # once per eight rows, and the eight rows come from L1.
    x0, x1, x2, x3 = X[i], X[i + 1], X[i + 2], X[i + 3]
    x4, x5, x6, x7 = X[i + 4], X[i + 5], X[i + 6], X[i + 7]
    r0, r1, r2, r3 = r[o], r[o + 1], r[o + 2], r[o + 3]
    r4, r5, r6, r7 = r[o + 4], r[o + 5], r[o + 6], r[o + 7]
    for j in range(d):
        g[j] += ((r0 * x0[j] + r1 * x1[j]) + (r2 * x2[j] + r3 * x3[j])) + \
                ((r4 * x4[j] + r5 * x5[j]) + (r6 * x6[j] + r7 * x7[j]))
    return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _linear_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
                  g: np.ndarray, pf: bool) -> float:
    """Add rows lo..hi's squared-loss gradient to g (d+1,) (zeroed here); return the loss."""
    # Blocks of eight rows: the logits two rows per pass (_dot2), the residual (one
    # subtraction) in line, then the gradient of the eight rows in one pass (_glm_add8)
    # while they are in L1. X is read from memory once; with pf, rows ahead are prefetched
    # (one per logit pass, four per gradient pass: _PF_ROWS).
    d = X.shape[1]
    g[:] = 0.0
    b = float(w[d])
    loss = 0.0
    gb = 0.0
    r = np.empty(8)
    nxt = _first_prefetch(X, lo, pf)
    i = lo
    while i + 8 <= hi:
        for t in range(0, 8, 2):
            prefetch_rows(X, nxt, nxt + 1, True)
            nxt += 1
            s0, s1 = _dot2(X[i + t], X[i + t + 1], w, d, 0.0)
            r0 = (s0 + b) - y[i + t]
            r1 = (s1 + b) - y[i + t + 1]
            r[t] = r0
            r[t + 1] = r1
            loss += 0.5 * r0 * r0 + 0.5 * r1 * r1
        prefetch_rows(X, nxt, nxt + 4, True)
        nxt += 4
        gb += _glm_add8(g, X, i, r, 0, d)
        i += 8
    for t in range(i, hi):
        x = X[t]
        s0, _ = _dot2(x, x, w, d, 0.0)
        rt = (s0 + b) - y[t]
        loss += 0.5 * rt * rt
        gb += rt
        for j in range(d):
            g[j] += rt * x[j]
    g[d] = gb
    return loss


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _logistic_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
                    g: np.ndarray, blk: int, pf: bool) -> float:
    """Add rows lo..hi's log-loss gradient to g (d+1,) (zeroed here); return the loss."""
    # Blocks of _BLOCK rows in three passes. (1) The logits, dot products of two adjacent
    # rows at a time (_dot2), so X is read in address order: reading rows interleaved
    # makes short streams that the hardware prefetcher does not follow (measured 3x
    # slower from DRAM). (2) The block's residuals and losses together, a SIMD loop over
    # rows (exp and log1p from kernels.vmath: libm's would be two scalar calls per row).
    # (3) The gradient, eight rows per pass over g (_glm_add8), the rows now in L1. X is
    # read from memory once; with pf, rows ahead are prefetched as in _linear_chunk. The
    # order of every sum is fixed by the code, not by the vector width nor by the thread
    # count.
    d = X.shape[1]
    g[:] = 0.0
    b = float(w[d])
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
        for t in range(0, m, 2):
            prefetch_rows(X, nxt, nxt + 1, True)
            nxt += 1
            # An odd last row is paired with itself, so it is summed as any other row.
            s0, s1 = _dot2(X[i + t], X[i + min(t + 1, m - 1)], w, d, 0.0)
            z[t] = s0 + b
            if t + 1 < m:
                z[t + 1] = s1 + b
        for t in range(m):
            yb[t] = y[i + t]
        loss += vmath.logistic_rows(z, yb, rb, lb, m)
        t = 0
        while t + 8 <= m:
            prefetch_rows(X, nxt, nxt + 4, True)
            nxt += 4
            gb += _glm_add8(g, X, i + t, rb, t, d)
            t += 8
        for u in range(t, m):
            x = X[i + u]
            ru = rb[u]
            gb += ru
            for j in range(d):
                g[j] += ru * x[j]
        i += m
    g[d] = gb
    return loss


@njit(cache=True, nogil=True)
def _glm_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
               g: np.ndarray, logistic: bool, blk: int, pf: bool) -> float:
    """Add rows lo..hi's gradient to g (d+1,) (zeroed here); return their loss sum."""
    if logistic:
        return _logistic_chunk(X, y, w, lo, hi, g, blk, pf)
    return _linear_chunk(X, y, w, lo, hi, g, pf)


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
def _glm_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray, logistic: bool) -> float:
    """Fill g (d+1,) with the summed gradient over fixed row chunks on one thread."""
    n = X.shape[0]
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in range(nc):
        losses[c] = _glm_chunk(X, y, w, n * c // nc, n * (c + 1) // nc, parts[c], logistic, _BLOCK, pf)
    return _combine(parts, losses, g)


@njit(cache=True, nogil=True, parallel=True)
def _glm_grad_threads(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray,
                      logistic: bool) -> float:
    """Same chunks and result as ``_glm_grad``, the chunks spread over numba's threads."""
    n = X.shape[0]
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in prange(nc):
        losses[c] = _glm_chunk(X, y, w, n * c // nc, n * (c + 1) // nc, parts[c], logistic, _BLOCK, pf)
    return _combine(parts, losses, g)


# --------------------------------------------------------------------------- float32 compute
# ``model.compute: float32``: X is never converted to float64. w is cast to float32 once per
# call; each row's logit is a float32 FMA chain (_dot2 with a float32 zero), widened to
# float64 for the residual, sigmoid and loss (as in the float64 kernels); the gradient of a
# block of _BLOCK rows is summed in float32 (_glm_add8 on float32 arrays) and added into
# the float64 gradient once per block. Loss and the bias's gradient sum float64 residuals.
# Rounding: float32 products summed over d (logits) or <= 32 rows (gradient blocks), so
# ~1e-6 relative per entry; the order is fixed by the code, as in the float64 kernels.
# Where the time goes (one thread, 1536 x 128 in L2): the logit pass alone ran at 0.85 of
# the bench's flat float32 read, the gradient pass alone at 0.62-0.65 (one FMA per element
# and g loaded and stored per eight rows; an FMA chain or 16 rows per pass: the same), so
# two passes over each row cap the kernel near 0.37 of that read; it reaches ~0.3.
# Tried: one merged loop (the next eight rows' logits and these eight rows' gradient per
# pass over j): 0.34 against 0.27 at L2 size but 0.22 against 0.56 from DRAM, so not done.

# Rows per float32 block: _BLOCK, as the float64 kernels. bench_kernels, one thread, three
# runs each, the float32 kernel's time against the float64 kernel's in the same run (>1:
# faster), 16 / 32 rows, before the kernels prefetched: L2 size logistic 1.17-1.30 /
# 1.35-1.53, linear 1.18-1.37 / 1.22-1.42; from DRAM logistic 1.07-1.18 / 0.78-0.85, linear
# 1.04-1.13 / 0.78-0.92. With the prefetch, 32 rows win from DRAM too (at _BLOCK).


@njit(cache=True, nogil=True)
def _glm32_chunk(X: np.ndarray, y: np.ndarray, w32: np.ndarray, b: float, lo: int, hi: int,
                 g: np.ndarray, logistic: bool, blk: int, pf: bool) -> float:
    """Add rows lo..hi's gradient to g (d+1,) (zeroed here), products in float32; return the loss."""
    d = X.shape[1]
    g[:] = 0.0
    g32 = np.empty(d, dtype=np.float32)
    z = np.empty(blk)
    yb = np.empty(blk)
    rb = np.empty(blk)
    lb = np.empty(blk)
    r32 = np.empty(blk, dtype=np.float32)
    zero = np.float32(0.0)
    loss = 0.0
    gb = 0.0
    nxt = _first_prefetch(X, lo, pf)   # prefetch as in _logistic_chunk
    i = lo
    while i < hi:
        m = min(blk, hi - i)
        for t in range(0, m, 2):
            prefetch_rows(X, nxt, nxt + 1, True)
            nxt += 1
            # An odd last row is paired with itself (as in _logistic_chunk).
            s0, s1 = _dot2(X[i + t], X[i + min(t + 1, m - 1)], w32, d, zero)
            z[t] = float(s0) + b
            if t + 1 < m:
                z[t + 1] = float(s1) + b
        if logistic:
            for t in range(m):
                yb[t] = y[i + t]
            loss += vmath.logistic_rows(z, yb, rb, lb, m)
            for t in range(m):
                gb += rb[t]
                r32[t] = np.float32(rb[t])
        else:
            # Residual, loss, bias gradient and the float32 copy in one loop (from DRAM
            # 1.04-1.05x over a loop each; the sums run in the same order, so same bits).
            for t in range(m):
                rt = z[t] - y[i + t]
                loss += 0.5 * rt * rt
                gb += rt
                r32[t] = np.float32(rt)
        g32[:] = zero
        t = 0
        while t + 8 <= m:
            prefetch_rows(X, nxt, nxt + 4, True)
            nxt += 4
            _glm_add8(g32, X, i + t, r32, t, d)   # its float32 residual sum is not used
            t += 8
        for u in range(t, m):
            x = X[i + u]
            ru = r32[u]
            for j in range(d):
                g32[j] += ru * x[j]
        for j in range(d):
            g[j] += float(g32[j])
        i += m
    g[d] = gb
    return loss


@njit(cache=True, nogil=True)
def _glm32_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray, logistic: bool) -> float:
    """``_glm_grad`` with float32 products (``_glm32_chunk``): same chunks, one thread."""
    n, d = X.shape
    w32 = w[:d].astype(np.float32)
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in range(nc):
        losses[c] = _glm32_chunk(X, y, w32, float(w[d]), n * c // nc, n * (c + 1) // nc, parts[c], logistic, _BLOCK, pf)
    return _combine(parts, losses, g)


@njit(cache=True, nogil=True, parallel=True)
def _glm32_grad_threads(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray,
                        logistic: bool) -> float:
    """Same chunks and result as ``_glm32_grad``, the chunks spread over numba's threads."""
    n, d = X.shape
    w32 = w[:d].astype(np.float32)
    nc = _n_chunks(n)
    pf = _prefetches(X)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in prange(nc):
        losses[c] = _glm32_chunk(X, y, w32, float(w[d]), n * c // nc, n * (c + 1) // nc, parts[c], logistic, _BLOCK, pf)
    return _combine(parts, losses, g)
