"""Linear and logistic-regression gradient kernels: fused passes over float32 X, one thread.

The raw kernels behind ``kernels.cpu.linear_grad`` / ``logistic_grad`` (which check the
arguments and pick the one- or many-thread driver); conventions as in ``kernels.cpu``.
Also the fixed row chunking that the softmax kernels in ``kernels.cpu`` share.

Where the time goes (a Zen 4 core, X 1536 x 128 float32 in L2, per element of X): the
float32 -> float64 conversion (vcvtps2pd) is the scarcest resource, not the load. A dot
product and a gradient update each need x in float64, and the gradient of a row needs the
residual of its finished dot product, so each element is converted twice, once per pass;
keeping the converted block in an L1 buffer instead costs a 64-byte store per eight
elements, which measured slower than converting again. Everything else is arranged so the
two conversions (and their FMAs) are all that is left:
- the dot products contract multiply and add into one FMA ("contract") and run two rows
  per pass over w (w loaded once per two rows, eight rows' worth of loads in flight);
- the gradient adds eight rows per pass over g as one chain of FMAs per element (g
  loaded and stored once per eight rows);
- the logistic's residuals (exp and log1p, kernels.vmath) are a long chain of dependent
  vector operations: they are computed one block AHEAD of the gradient that uses them
  (software pipelining), so their latency overlaps the previous block's gradient FMAs
  instead of stalling the core between the two passes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import vmath

# Row chunks: a FIXED count that depends only on n, never on the thread count. Each chunk
# sums its rows into its own partial gradient and the partials are added in chunk order,
# so one thread and many threads give bit-identical results (the threaded drivers only
# run the same chunks concurrently).
_CHUNKS = 16
_CHUNK_MIN_ROWS = 512

# Rows per logistic block: enough for a SIMD loop over the block's exp/log1p, few enough
# that two blocks' rows (16 KiB at d = 128; the pipeline keeps two in flight) stay in L1
# between a block's logit pass and its gradient pass. A compile-time constant, so the
# residual loops have a known trip count and no scalar remainder.
_BLOCK = 16


@njit(cache=True, nogil=True)
def _n_chunks(n: int) -> int:
    """Return the number of row chunks for n rows (1..16, independent of threads)."""
    return max(1, min(_CHUNKS, n // _CHUNK_MIN_ROWS))


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _dot2(x0: np.ndarray, x1: np.ndarray, w: np.ndarray, d: int) -> tuple[float, float]:
    """Return (x0 . w, x1 . w) over j < d in float64 (order: LLVM's vector reduction)."""
    # Two rows per pass: w is loaded once for both, and two rows' cache lines are in
    # flight at once (both rows are adjacent in X: one stream to the prefetcher). One FMA
    # per element ("contract"; 1.1x the mul + add's rate at L2 size). Reassociation lets
    # LLVM vectorise the reduction, so the order follows the node's vector width: results
    # may differ in the last bits between AVX2 and AVX-512 nodes, never between slots,
    # calls or thread counts. Sync kind 'exact' does not use these kernels.
    s0 = 0.0
    s1 = 0.0
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
                  g: np.ndarray) -> float:
    """Add rows lo..hi's squared-loss gradient to g (d+1,) (zeroed here); return the loss."""
    # Blocks of eight rows: the logits two rows per pass (_dot2), the residual (one
    # subtraction) in line, then the gradient of the eight rows in one pass (_glm_add8)
    # while they are in L1. X is read from memory once.
    d = X.shape[1]
    g[:] = 0.0
    b = float(w[d])
    loss = 0.0
    gb = 0.0
    r = np.empty(8)
    i = lo
    while i + 8 <= hi:
        for t in range(0, 8, 2):
            s0, s1 = _dot2(X[i + t], X[i + t + 1], w, d)
            r0 = (s0 + b) - y[i + t]
            r1 = (s1 + b) - y[i + t + 1]
            r[t] = r0
            r[t + 1] = r1
            loss += 0.5 * r0 * r0 + 0.5 * r1 * r1
        gb += _glm_add8(g, X, i, r, 0, d)
        i += 8
    for t in range(i, hi):
        x = X[t]
        s0, _ = _dot2(x, x, w, d)
        rt = (s0 + b) - y[t]
        loss += 0.5 * rt * rt
        gb += rt
        for j in range(d):
            g[j] += rt * x[j]
    g[d] = gb
    return loss


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def _logistic_residuals(X: np.ndarray, y: np.ndarray, w: np.ndarray, i: int, m: int,
                        z: np.ndarray, yb: np.ndarray, r: np.ndarray, rbits: np.ndarray,
                        lrow: np.ndarray) -> float:
    """Set r[:m] to the residuals of rows i..i+m (m <= _BLOCK); return their loss sum."""
    d = X.shape[1]
    b = float(w[d])
    for t in range(0, m, 2):
        # An odd last row is paired with itself, so it is summed as any other row.
        s0, s1 = _dot2(X[i + t], X[i + min(t + 1, m - 1)], w, d)
        z[t] = s0 + b
        if t + 1 < m:
            z[t + 1] = s1 + b
    for t in range(m):
        yb[t] = y[i + t]
    # Always _BLOCK rows (a constant: SIMD loops with no scalar remainder), the rows past
    # m padded with z = y = 0 and then ignored. Strict IEEE (and error_model="numpy",
    # which the inlined vmath code needs to vectorise its divisions), so a row's residual
    # and loss depend neither on its lane nor on whether the block was full.
    for t in range(m, _BLOCK):
        z[t] = 0.0
        yb[t] = 0.0
    vmath.logistic_residuals(z, yb, r, rbits, lrow, _BLOCK)
    loss = 0.0
    for t in range(m):
        loss += lrow[t]
    return loss


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _grad_rows(g: np.ndarray, X: np.ndarray, i: int, m: int, r: np.ndarray, gb: float) -> float:
    """Add rows i..i+m of X times r[:m] to g; return gb plus the residuals (row order)."""
    d = X.shape[1]
    t = 0
    while t + 8 <= m:
        gb += _glm_add8(g, X, i + t, r, t, d)
        t += 8
    for u in range(t, m):
        x = X[i + u]
        ru = r[u]
        gb += ru
        for j in range(d):
            g[j] += ru * x[j]
    return gb


@njit(cache=True, nogil=True)
def _logistic_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
                    g: np.ndarray) -> float:
    """Add rows lo..hi's log-loss gradient to g (d+1,) (zeroed here); return the loss."""
    # Blocks of _BLOCK rows, software-pipelined: the logits and residuals of block k+1
    # (_logistic_residuals: logits by _dot2, then exp/log1p in SIMD lanes) are computed
    # BEFORE the gradient of block k (_grad_rows), into the other of two residual
    # buffers. The gradient of block k does not depend on them, so the out-of-order core
    # runs the residuals' long dependency chain under block k's gradient FMAs. Rows are
    # read from memory in address order (the prefetcher follows one stream) and re-read
    # for the gradient from L1 (two blocks, 16 KiB at d = 128). The order of every sum
    # (rows within a block, blocks, the loss) is that of the unpipelined loop: fixed by
    # the code, not by the vector width nor by the thread count.
    d = X.shape[1]
    g[:] = 0.0
    z = np.empty(_BLOCK)
    yb = np.empty(_BLOCK)
    lb = np.empty(_BLOCK)
    ra = np.empty(_BLOCK)
    rb = np.empty(_BLOCK)
    ra_bits = ra.view(np.int64)
    rb_bits = rb.view(np.int64)
    loss = 0.0
    gb = 0.0
    if lo < hi:
        loss += _logistic_residuals(X, y, w, lo, min(_BLOCK, hi - lo), z, yb, ra, ra_bits, lb)
    i = lo
    while i < hi:
        m = min(_BLOCK, hi - i)
        nxt = i + m
        if nxt < hi:
            loss += _logistic_residuals(X, y, w, nxt, min(_BLOCK, hi - nxt), z, yb, rb,
                                        rb_bits, lb)
        gb = _grad_rows(g, X, i, m, ra, gb)
        ra, rb = rb, ra
        ra_bits, rb_bits = rb_bits, ra_bits
        i = nxt
    g[d] = gb
    return loss


@njit(cache=True, nogil=True)
def _glm_chunk(X: np.ndarray, y: np.ndarray, w: np.ndarray, lo: int, hi: int,
               g: np.ndarray, logistic: bool) -> float:
    """Add rows lo..hi's gradient to g (d+1,) (zeroed here); return their loss sum."""
    if logistic:
        return _logistic_chunk(X, y, w, lo, hi, g)
    return _linear_chunk(X, y, w, lo, hi, g)


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
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in range(nc):
        losses[c] = _glm_chunk(X, y, w, n * c // nc, n * (c + 1) // nc, parts[c], logistic)
    return _combine(parts, losses, g)


@njit(cache=True, nogil=True, parallel=True)
def _glm_grad_threads(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray,
                      logistic: bool) -> float:
    """Same chunks and result as ``_glm_grad``, the chunks spread over numba's threads."""
    n = X.shape[0]
    nc = _n_chunks(n)
    parts = np.empty((nc, g.shape[0]))
    losses = np.empty(nc)
    for c in prange(nc):
        losses[c] = _glm_chunk(X, y, w, n * c // nc, n * (c + 1) // nc, parts[c], logistic)
    return _combine(parts, losses, g)
