"""Vectorisable exp and log1p for the logistic kernels: plain arithmetic, no libm calls.

LLVM cannot vectorise a loop that calls libm's exp or log1p (numba has no vector math
library here), so the logistic gradient paid two scalar calls per row: about a third of
its time at L2-resident sizes. These versions are only multiplies, adds, one divide and
an integer bit trick, so a loop over a block of rows compiles to SIMD code.

Compiled with error_model="numpy": numba's default checks every float division for a
zero divisor, and that branch alone keeps LLVM from vectorising the loop (the divisors
here are >= 1 anyway). Compiled without fastmath: each operation rounds as written, so a row's result is the
same in a vector lane or in a scalar remainder iteration, on any vector width (no FMA
contraction either). Accuracy: within a few ulps of libm (tests/unit/test_kernels.py).

The ``*32`` versions are the same in float32 for the float32-compute GLM kernels: 16 lanes
a vector instead of 8 and shorter polynomials (float32 needs ~1e-7, not 1e-16), so a
32-row residual block takes 2.5 ns a row against 4.6 (one thread, Zen 4).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Cody-Waite split of ln 2 (fdlibm): k * _LN2_HI is exact for |k| < 2**11.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# Adding 1.5 * 2**52 rounds to an integer (round-to-nearest-even) in one add.
_ROUND = 6755399441055744.0
# exp(x) for x < _EXP_MIN would be subnormal: returned as 0 (the logistic uses exp(-|z|)
# with |z| > 708, where the sigmoid is 1 to full precision and log1p(e) is below 1e-307).
_EXP_MIN = -708.0
# Taylor coefficients 1/j!, j = 0..13: on |r| <= ln2/2 the first omitted term is < 5e-18.
_EXP_C = (1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
          1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
          1.0 / 6227020800)

# 1/j for the log1p series, rounded once here rather than divided per call.
_INV = tuple(1.0 / j if j else 0.0 for j in range(34))


# float32 constants: ln 2 split so that k * _LN2_HI32 is exact for |k| < 2**8 (its low
# 12 bits are zero); 1.5 * 2**23 rounds a float32 to an integer; exp(x) for x < -87 is
# returned as 0 (float32 turns subnormal below about -87.34; there log1p(e) < 2e-38 and
# the sigmoid is 0 or 1 to float32 precision).
_LN2_HI32 = np.float32(0.693145751953125)
_LN2_LO32 = np.float32(1.428606765330187e-06)
_INV_LN2_32 = np.float32(_INV_LN2)
_ROUND32 = np.float32(12582912.0)
_EXP_MIN32 = np.float32(-87.0)
# Taylor terms to r^7 (on |r| <= ln2/2 the next is < 2.1e-8 relative) and 1/j to j = 15
# for the log1p series in t <= 1/9 (the next term is below 3e-9).
_EXP_C32 = tuple(np.float32(c) for c in _EXP_C[:8])
_INV32 = tuple(np.float32(v) for v in _INV[:16])
_ONE32 = np.float32(1.0)
_TWO32 = np.float32(2.0)
_ZERO32 = np.float32(0.0)


def _bits_as(float_t, int_t, ir_t):  # type: ignore[no-untyped-def]
    """Return an intrinsic giving the float_t whose bits are an integer (cast to int_t)."""

    @intrinsic
    def as_float(typingctx, v):  # type: ignore[no-untyped-def]
        # A register move, no memory: how exp builds 2**k from k's exponent bits.
        if not isinstance(v, types.Integer):
            return None

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(context.cast(builder, args[0], sig.args[0], int_t), ir_t)

        return float_t(v), codegen

    return as_float


_as_float64 = _bits_as(types.float64, types.int64, ir.DoubleType())
_as_float32 = _bits_as(types.float32, types.int32, ir.FloatType())


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy", inline="always")
def exp_neg_abs(x: float) -> float:
    """Return exp(-|x|) (0 where |x| > 708); inlined, so a loop of it is SIMD."""
    xi = max(-abs(x), _EXP_MIN)
    # k = round(-|x| / ln2) in [-1022, 0] (clamped first); 2**k made from its bits.
    k = (xi * _INV_LN2 + _ROUND) - _ROUND
    two_k = _as_float64((np.int64(k) + 1023) << 52)
    r = (xi - k * _LN2_HI) - k * _LN2_LO
    # Estrin's scheme for the terms r^3..r^13 (a tree of depth 4 instead of a chain
    # of 10 multiply-adds), Horner for the three largest terms, whose rounding
    # dominates the result (Estrin throughout: 2 ulps against libm instead of 1).
    # The latency per row block (what bounds a block of 16 rows: too few rows for
    # the core to overlap) falls by a third; see logistic_rows.
    r2 = r * r
    r4 = r2 * r2
    q = (((_EXP_C[3] + _EXP_C[4] * r) + (_EXP_C[5] + _EXP_C[6] * r) * r2)
         + ((_EXP_C[7] + _EXP_C[8] * r) + (_EXP_C[9] + _EXP_C[10] * r) * r2) * r4) \
        + ((_EXP_C[11] + _EXP_C[12] * r) + _EXP_C[13] * r2) * (r4 * r4)
    p = _EXP_C[0] + r * (_EXP_C[1] + r * (_EXP_C[2] + r * q))
    return p * two_k if -abs(x) >= _EXP_MIN else 0.0


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def exp_minus_abs(x: np.ndarray, out: np.ndarray, m: int) -> None:
    """Set out[:m] = exp(-|x[:m]|) (0 where |x| > 708); SIMD over the m values."""
    for i in range(m):
        out[i] = exp_neg_abs(x[i])


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy", inline="always")
def log1p_unit(e: float) -> float:
    """Return log(1 + e) for 0 <= e <= 1: 2 atanh(s), s = e / (2 + e) <= 1/3."""
    # s is formed from e directly (not from 1 + e, which would round away e's low bits),
    # so tiny e keep full relative accuracy. Series in s^2 <= 1/9: the term after
    # s^33/33 is below 2e-18 relative.
    s = e / (2.0 + e)
    t = s * s
    # Estrin's scheme (depth 4, not a chain of 15: see exp_minus_abs).
    t2 = t * t
    t4 = t2 * t2
    p = (((_INV[3] + _INV[5] * t) + (_INV[7] + _INV[9] * t) * t2)
         + ((_INV[11] + _INV[13] * t) + (_INV[15] + _INV[17] * t) * t2) * t4) \
        + (((_INV[19] + _INV[21] * t) + (_INV[23] + _INV[25] * t) * t2)
           + ((_INV[27] + _INV[29] * t) + (_INV[31] + _INV[33] * t) * t2) * t4) * (t4 * t4)
    return 2.0 * s + 2.0 * s * (t * p)


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def logistic_rows(z: np.ndarray, y: np.ndarray, r: np.ndarray, lrow: np.ndarray, m: int) -> float:
    """Set r[:m] to sigmoid(z) - y and return the summed log-loss of the m rows.

    z (logits), y, r and lrow (scratch for the rows' losses) have length >= m. A row's
    loss is log1p(exp(-|z|)) + max(z, 0) - y z (stable for any z). SIMD in vectors of
    8 rows on AVX-512 (LLVM 22, checked with inspect_asm), the m % 8 left scalar.
    """
    # One loop for exp, sigmoid and loss (no pass through memory between them: the
    # block's time is its dependency chain). Per-row losses go to lrow so this loop has
    # no reduction and vectorises; the sum is taken after, in row order.
    for i in range(m):
        zi = z[i]
        e = exp_neg_abs(zi)
        q = 1.0 / (1.0 + e)
        p = q if zi >= 0.0 else e * q
        r[i] = p - y[i]
        lrow[i] = log1p_unit(e) + max(zi, 0.0) - y[i] * zi
    loss = 0.0
    for i in range(m):
        loss += lrow[i]
    return loss


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy", inline="always")
def exp_neg_abs32(x: np.float32) -> np.float32:
    """Return exp(-|x|) in float32 (0 where |x| > 87), as exp_neg_abs."""
    xi = max(-abs(x), _EXP_MIN32)
    k = (xi * _INV_LN2_32 + _ROUND32) - _ROUND32
    two_k = _as_float32((np.int32(k) + np.int32(127)) << np.int32(23))
    r = (xi - k * _LN2_HI32) - k * _LN2_LO32
    r2 = r * r
    c = _EXP_C32
    q = (c[3] + c[4] * r) + ((c[5] + c[6] * r) + c[7] * r2) * r2
    p = c[0] + r * (c[1] + r * (c[2] + r * q))
    return p * two_k if -abs(x) >= _EXP_MIN32 else _ZERO32


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy", inline="always")
def log1p_unit32(e: np.float32) -> np.float32:
    """Return log(1 + e) in float32 for 0 <= e <= 1, as log1p_unit."""
    s = e / (_TWO32 + e)
    t = s * s
    t2 = t * t
    v = _INV32
    p = ((v[3] + v[5] * t) + (v[7] + v[9] * t) * t2) + ((v[11] + v[13] * t) + v[15] * t2) * (t2 * t2)
    return _TWO32 * s + _TWO32 * s * (t * p)


@njit(cache=True, fastmath=False, nogil=True, error_model="numpy")
def logistic_rows32(z: np.ndarray, y: np.ndarray, r: np.ndarray, lrow: np.ndarray, m: int) -> float:
    """logistic_rows in float32: z, y, r, lrow float32; the loss summed in float64.

    Written so that float32 does not cancel: for z >= 0 the residual is (1 - y) - e q
    and not q - y (q = 1 / (1 + e) rounds to 1 long before e q is negligible against a
    residual near 0), and a row's loss is log1p(e) + (1 - y) z or log1p(e) - y z, not
    log1p(e) + max(z, 0) - y z (which loses log1p(e) next to a large z).
    """
    for i in range(m):
        zi = z[i]
        yi = y[i]
        e = exp_neg_abs32(zi)
        eq = e * (_ONE32 / (_ONE32 + e))
        r[i] = ((_ONE32 - yi) - eq) if zi >= _ZERO32 else (eq - yi)
        lin = (_ONE32 - yi) * zi if zi > _ZERO32 else -yi * zi
        lrow[i] = log1p_unit32(e) + lin
    loss = 0.0
    for i in range(m):
        loss += float(lrow[i])
    return loss
