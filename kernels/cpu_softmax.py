"""The softmax-regression kernels of ``kernels.cpu``: gradient sums and probabilities.

Same conventions as ``kernels.cpu`` (which checks the arguments and is the public entry
point). The gradient and the probabilities work in blocks of eight rows; what each step
does to approach one core's FMA peak, and what was tried, is written beside it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kernels import simd, vmath
from kernels.cpu_glm import _n_chunks
from kernels.prefetch import prefetch_rows


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_residual(z: np.ndarray, label: int) -> float:
    """Replace logits z (k,) by softmax(z) - onehot(label); return the cross-entropy."""
    k = z.shape[0]
    m = z[0]
    for c in range(1, k):
        m = max(m, z[c])
    # Taken before exp: exp(z_label - m) may underflow to 0 for a confident miss.
    zl = z[label] - m
    s = 0.0
    for c in range(k):
        z[c] = math.exp(z[c] - m)
        s += z[c]
    inv = 1.0 / s
    for c in range(k):
        z[c] *= inv
    z[label] -= 1.0
    return math.log(s) - zl


# Rows per softmax block: one zmm of float64 lanes in the class-major logits Z (k, 8).
_SM_ROWS = 8

# vmath's exp compiled again with FMA contraction, inlined into ``_softmax8``: its
# polynomial's multiply-adds become one FMA each (80 values at a time: 0.78 against 1.05
# ns an exp; with the earlier Horner form 10.5 against 15.4 ns a row at k = 10).
# Contraction rounds the same in a vector lane and in a scalar remainder iteration (both
# are FMAs), and a row always lands in the same place of its chunk, so results still do
# not depend on the thread count.
_exp_neg = njit(fastmath={"contract"}, nogil=True, error_model="numpy",
                inline="always")(vmath.exp_minus_abs.py_func)


@njit(cache=True, nogil=True)
def _rows8(X: np.ndarray, i: int, R: np.ndarray) -> None:
    """Copy X's rows i..i+8 (float32) into R (8, d) as float64."""
    for r in range(_SM_ROWS):
        x = X[i + r]
        rr = R[r]
        for j in range(x.shape[0]):
            rr[j] = x[j]


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _softmax_logits8(R: np.ndarray, WT: np.ndarray, W: np.ndarray, Z: np.ndarray, X: np.ndarray,
                     pf: int, pf_end: int) -> int:
    """Set Z (k, 8) to the logits of the eight float64 rows R (8, d): Z[c, r] = R[r].WT[c] + b.

    Prefetches X's row pf (then pf + 1, ...) before each pass over d, up to pf_end;
    returns the next row to prefetch.
    """
    # Register tiles of 8 rows x 2 classes: per step over d, 10 vector loads (8 rows, 2
    # weight rows) feed 16 FMAs into 16 vector accumulators (LLVM keeps all 16 in zmm
    # registers, no spills), where one class at a time took 9 loads per 8 FMAs. Each sum
    # runs over d in LLVM's vector order, then is reduced across lanes.
    d = R.shape[1]
    k = WT.shape[0]
    r0, r1, r2, r3, r4, r5, r6, r7 = R[0], R[1], R[2], R[3], R[4], R[5], R[6], R[7]
    c = 0
    while c + 2 <= k:
        if pf < pf_end:
            prefetch_rows(X, pf, pf + 1)
            pf += 1
        wa = WT[c]
        wb = WT[c + 1]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = 0.0
        for j in range(d):
            u = wa[j]
            w = wb[j]
            v = r0[j]
            a0 += v * u
            b0 += v * w
            v = r1[j]
            a1 += v * u
            b1 += v * w
            v = r2[j]
            a2 += v * u
            b2 += v * w
            v = r3[j]
            a3 += v * u
            b3 += v * w
            v = r4[j]
            a4 += v * u
            b4 += v * w
            v = r5[j]
            a5 += v * u
            b5 += v * w
            v = r6[j]
            a6 += v * u
            b6 += v * w
            v = r7[j]
            a7 += v * u
            b7 += v * w
        za, zb = Z[c], Z[c + 1]
        u = W[d, c]
        w = W[d, c + 1]
        za[0], za[1], za[2], za[3] = a0 + u, a1 + u, a2 + u, a3 + u
        za[4], za[5], za[6], za[7] = a4 + u, a5 + u, a6 + u, a7 + u
        zb[0], zb[1], zb[2], zb[3] = b0 + w, b1 + w, b2 + w, b3 + w
        zb[4], zb[5], zb[6], zb[7] = b4 + w, b5 + w, b6 + w, b7 + w
        c += 2
    if c < k:   # odd k: the last class alone
        wa = WT[c]
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        for j in range(d):
            u = wa[j]
            a0 += r0[j] * u
            a1 += r1[j] * u
            a2 += r2[j] * u
            a3 += r3[j] * u
            a4 += r4[j] * u
            a5 += r5[j] * u
            a6 += r6[j] * u
            a7 += r7[j] * u
        za = Z[c]
        u = W[d, c]
        za[0], za[1], za[2], za[3] = a0 + u, a1 + u, a2 + u, a3 + u
        za[4], za[5], za[6], za[7] = a4 + u, a5 + u, a6 + u, a7 + u
    return pf


@njit(cache=True, fastmath={"contract"}, nogil=True, error_model="numpy")
def _softmax8(Z: np.ndarray, D: np.ndarray, E: np.ndarray, s: np.ndarray) -> None:
    """Replace logits Z (k, 8) of eight rows by their softmax; leave D = z - max, s = sums.

    D, E (k * 8) are scratch. Same steps as ``_softmax_residual`` (max, exp, sum in
    class order, times the inverse), with the exp from kernels.vmath in SIMD over all
    k * 8 values at once, where one row at a time made k libm calls: 72 ns a row at
    k = 10 (a third of the old kernel), now ~22.
    """
    # The max, shift, sum and scale run as 8-lane vectors (kernels.simd; one class a
    # step, so the order of each row's sum is the class order, as in the scalar loops
    # they replace, bit for bit). numba left those loops scalar (no SLP vectoriser):
    # 27 against 22 ns a row for the whole block at k = 10. Tried before, with the
    # gradient at n = 1536, k = 10 (of FMA peak, same run): the lanes as tuple statements
    # (still scalar), flat k * 8 loops with distance-8 recurrences (the loop vectoriser
    # takes them: 0.57 against 0.63), the row count read from Z's shape (0.57 against 0.60).
    simd.softmax8_shift(Z, D)
    _exp_neg(D, E, Z.shape[0] * _SM_ROWS)   # exp(D), D <= 0
    simd.softmax8_scale(E, Z, s)


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _softmax_grad8(R: np.ndarray, Z: np.ndarray, part: np.ndarray, X: np.ndarray, pf: int,
                   pf_end: int) -> int:
    """Add the eight rows R (8, d) weighted by Z (k, 8) to the gradient rows part (k, d+1).

    Prefetches as ``_softmax_logits8`` does; returns the next row to prefetch.
    """
    # Two classes per pass over d: the eight row vectors are loaded once for both, so a
    # step is 10 vector loads and 2 stores per 16 FMAs (one class: 9 loads, 1 store per 8);
    # the 16 weights stay in registers as broadcasts. Each element adds its eight rows in
    # the order LLVM gives the expression below (fixed by the code, not the thread count).
    d = R.shape[1]
    k = Z.shape[0]
    r0, r1, r2, r3, r4, r5, r6, r7 = R[0], R[1], R[2], R[3], R[4], R[5], R[6], R[7]
    c = 0
    while c + 2 <= k:
        if pf < pf_end:
            prefetch_rows(X, pf, pf + 1)
            pf += 1
        za, zb = Z[c], Z[c + 1]
        p0, p1, p2, p3, p4, p5, p6, p7 = za[0], za[1], za[2], za[3], za[4], za[5], za[6], za[7]
        q0, q1, q2, q3, q4, q5, q6, q7 = zb[0], zb[1], zb[2], zb[3], zb[4], zb[5], zb[6], zb[7]
        ga, gb = part[c], part[c + 1]
        for j in range(d):
            v0, v1, v2, v3 = r0[j], r1[j], r2[j], r3[j]
            v4, v5, v6, v7 = r4[j], r5[j], r6[j], r7[j]
            ga[j] += ((p0 * v0 + p1 * v1) + (p2 * v2 + p3 * v3)) + ((p4 * v4 + p5 * v5) + (p6 * v6 + p7 * v7))
            gb[j] += ((q0 * v0 + q1 * v1) + (q2 * v2 + q3 * v3)) + ((q4 * v4 + q5 * v5) + (q6 * v6 + q7 * v7))
        ga[d] += ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
        gb[d] += ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
        c += 2
    if c < k:   # odd k: the last class alone
        za = Z[c]
        p0, p1, p2, p3, p4, p5, p6, p7 = za[0], za[1], za[2], za[3], za[4], za[5], za[6], za[7]
        ga = part[c]
        for j in range(d):
            ga[j] += ((p0 * r0[j] + p1 * r1[j]) + (p2 * r2[j] + p3 * r3[j])) + \
                     ((p4 * r4[j] + p5 * r5[j]) + (p6 * r6[j] + p7 * r7[j]))
        ga[d] += ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    return pf


@njit(cache=True, fastmath={"reassoc", "contract"}, nogil=True)
def _softmax_chunk(X: np.ndarray, y: np.ndarray, W: np.ndarray, WT: np.ndarray, lo: int,
                   hi: int, part: np.ndarray) -> float:
    """Set part (k, d+1) to rows lo..hi's class-major gradient; return their loss sum."""
    # Compute-bound (2*k FMAs per element of X), so the aim is FMA throughput:
    # - class-major weights WT (k, d) and gradient rows part[c] make both passes
    #   vectorised loops over d (W's (d+1, k) layout would put k ~ 10 in the inner loop);
    # - blocks of eight rows, converted to float64 once into R (a sequential read of X),
    #   then register tiles of 8 rows x 2 classes in both passes (``_softmax_logits8``,
    #   ``_softmax_grad8``) and the block's softmax in SIMD over its 8 x k logits
    #   (``_softmax8``), class-major in Z (k, 8) so that a class's 8 rows are one vector;
    # - the next block's rows are prefetched while this one computes, one row before each
    #   pass over d: the hardware prefetcher sat idle during a block's ~1 us of arithmetic
    #   and the next block's first reads waited on DRAM (0.51 -> 0.60 of FMA peak at 200k
    #   rows, d = 128, same run); the same rows asked for in two bursts of four were
    #   slower (0.49 against 0.62, load ~4);
    # - the summation order is fixed by the code (eight-row blocks, chunk order), never by
    #   the thread count.
    # Where a row's time goes at n = 1536, k = 10 (~160 ns; removing one part at a time):
    # the two FMA passes ~108 ns (100 at peak), the softmax ~26, the float64 copy ~12
    # (16 stores of 64 bytes; Zen 4 stores 32 bytes a cycle), the rest ~15 (the lane
    # reductions of the logits, the loss, loop and call overhead). Tried, no gain:
    # converting the rows inside the first logits pass instead of a copy (0.57 against
    # 0.61: its 8 stores per step slow the FMA loop more than the copy costs), FMA passes
    # reading the float32 rows directly (no copy; 0.60 against 0.61), numba-level
    # inlining of the helpers (0.60 against 0.61).
    d = X.shape[1]
    k = WT.shape[0]
    part[:, :] = 0.0
    R = np.empty((_SM_ROWS, d))
    Z = np.empty((k, _SM_ROWS))
    D = np.empty(k * _SM_ROWS)
    E = np.empty(k * _SM_ROWS)
    s = np.empty(_SM_ROWS)
    loss = 0.0
    i = lo
    while i + _SM_ROWS <= hi:
        _rows8(X, i, R)
        nxt = i + _SM_ROWS   # the next block: one row prefetched per pass over d
        pf_end = min(hi, nxt + _SM_ROWS)
        pf = _softmax_logits8(R, WT, W, Z, X, nxt, pf_end)
        _softmax8(Z, D, E, s)
        # Loss: log(s) - (z_label - max) a row; the eight logs as one log of the product
        # (1 <= s <= k, so no overflow below k ~ 1e38; ~1e-15 relative): one libm call a
        # block instead of eight, +1.5% (0.607 against 0.596 of FMA peak at 200k rows).
        prod = 1.0
        for r in range(_SM_ROWS):
            label = int(y[i + r])
            prod *= s[r]
            loss -= D[label * _SM_ROWS + r]
            Z[label, r] -= 1.0
        loss += math.log(prod)
        pf = _softmax_grad8(R, Z, part, X, pf, pf_end)
        prefetch_rows(X, pf, pf_end)   # rows that k < 8 classes (fewer passes) left
        i += _SM_ROWS
    z = np.empty(k)
    xr = R[0]
    for t in range(i, hi):
        x = X[t]
        for j in range(d):
            xr[j] = x[j]
        for c in range(k):
            wc = WT[c]
            zc = 0.0
            for j in range(d):
                zc += xr[j] * wc[j]
            z[c] = zc + W[d, c]
        loss += _softmax_residual(z, int(y[t]))
        for c in range(k):
            q = z[c]
            gc = part[c]
            for j in range(d):
                gc[j] += q * xr[j]
            gc[d] += q
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_finish(parts: np.ndarray, losses: np.ndarray, g: np.ndarray) -> float:
    """Sum class-major parts (nc, k, d+1) in chunk order into g ((d+1)*k,); return loss."""
    nc, k, d1 = parts.shape
    acc = parts[0].copy()
    loss = losses[0]
    for c in range(1, nc):
        p = parts[c]
        for cl in range(k):
            for j in range(d1):
                acc[cl, j] += p[cl, j]
        loss += losses[c]
    G = g.reshape((d1, k))
    for j in range(d1):
        for cl in range(k):
            G[j, cl] = acc[cl, j]
    return loss


@njit(cache=True, nogil=True)
def _softmax_grad(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int, g: np.ndarray
) -> float:
    """Fill g ((d+1)*k,) with the summed softmax cross-entropy gradient; return loss."""
    n, d = X.shape
    W = W_flat.reshape((d + 1, k))
    WT = np.ascontiguousarray(W[:d].T)
    nc = _n_chunks(n)
    parts = np.empty((nc, k, d + 1))
    losses = np.empty(nc)
    for c in range(nc):
        losses[c] = _softmax_chunk(X, y, W, WT, n * c // nc, n * (c + 1) // nc, parts[c])
    return _softmax_finish(parts, losses, g)


@njit(cache=True, nogil=True, parallel=True)
def _softmax_grad_threads(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int, g: np.ndarray
) -> float:
    """Same chunks and result as ``_softmax_grad``, the chunks spread over threads."""
    n, d = X.shape
    W = W_flat.reshape((d + 1, k))
    WT = np.ascontiguousarray(W[:d].T)
    nc = _n_chunks(n)
    parts = np.empty((nc, k, d + 1))
    losses = np.empty(nc)
    for c in prange(nc):
        losses[c] = _softmax_chunk(X, y, W, WT, n * c // nc, n * (c + 1) // nc, parts[c])
    return _softmax_finish(parts, losses, g)


@njit(cache=True, nogil=True)
def _softmax_predict_proba(
    X: np.ndarray, W_flat: np.ndarray, k: int, out: np.ndarray
) -> None:
    """Fill out (n, k) with the softmax-regression class probabilities."""
    # The gradient's eight-row blocks (tiles, SIMD softmax, prefetch), without the gradient
    # pass; the last n % 8 rows one at a time.
    n, d = X.shape
    W = W_flat.reshape((d + 1, k))
    WT = np.ascontiguousarray(W[:d].T)
    R = np.empty((_SM_ROWS, d))
    Z = np.empty((k, _SM_ROWS))
    D = np.empty(k * _SM_ROWS)
    E = np.empty(k * _SM_ROWS)
    s = np.empty(_SM_ROWS)
    i = 0
    while i + _SM_ROWS <= n:
        _rows8(X, i, R)
        pf_end = min(n, i + 2 * _SM_ROWS)
        pf = _softmax_logits8(R, WT, W, Z, X, i + _SM_ROWS, pf_end)
        prefetch_rows(X, pf, pf_end)
        _softmax8(Z, D, E, s)
        for r in range(_SM_ROWS):
            o = out[i + r]
            for c in range(k):
                o[c] = Z[c, r]
        i += _SM_ROWS
    for t in range(i, n):
        z = out[t]
        for c in range(k):
            z[c] = W[d, c]
        for j in range(d):
            xj = np.float64(X[t, j])
            for c in range(k):
                z[c] += xj * W[j, c]
        mx = z[0]
        for c in range(1, k):
            mx = max(mx, z[c])
        sm = 0.0
        for c in range(k):
            z[c] = math.exp(z[c] - mx)
            sm += z[c]
        inv = 1.0 / sm
        for c in range(k):
            z[c] *= inv
