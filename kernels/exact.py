"""Per-row gradient factors and their fixed-point (int64) sums, for reproducible sync.

Every model's gradient sum is a sum over rows of outer products: for a parameter tensor
stored as ``(d + 1, k)`` (weights, then a bias row), row ``i`` contributes
``[U_i, 1] (outer) V_i`` with ``U_i`` the layer input (X, or a hidden activation) and
``V_i`` the residual / back-propagated delta. The ``*_rows`` kernels compute ``V`` row
by row with a fixed summation order, so a row's factors never depend on which other
rows share its batch (unlike BLAS, whose blocking may depend on the matrix shape).

``fixed_accumulate`` rounds every product ``u * v * scale`` to an int64 and adds it:
integer sums are associative, so the global sum is the same for any split of the rows
over ranks and any reduction order. ``fixed_scale`` picks the power-of-two scale from
the global row count and a global bound on ``|u * v|`` so the sum cannot overflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

from kernels import cpu, reference, sparse

__all__ = [
    "fixed_accumulate",
    "fixed_scale",
    "linear_rows",
    "logistic_rows",
    "mlp_rows",
    "row_bound",
    "softmax_rows",
    "warmup",
]

# U is a dense (n, d_t) array or, for CSR rows, a kernels.sparse.CsrBatch.
Factors = list[tuple[Any, np.ndarray]]

# |q| <= 2**(62 - ceil(log2 n)) per row, so n rows sum to below 2**62 + n/2 < 2**63.
_HEADROOM_BITS = 62
# Keep the scale and 1/scale normal float64 numbers (2**-1022 .. 2**1023).
_MAX_EXPONENT = 960


# --------------------------------------------------------------------------- kernels
# fastmath=False everywhere and no calls into kernels.cpu: a row's rounding must not
# follow the vector width of the node (cpu._dot may reassociate) or another module's edits.


@njit(cache=True, fastmath=False, nogil=True)
def _dot(x: np.ndarray, w: np.ndarray, d: int) -> float:
    """Return sum_j x[j] * w[j] over j < d in float64, in a fixed order (eight chains)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    m = d - d % 8
    for j in range(0, m, 8):
        s0 += x[j] * w[j]
        s1 += x[j + 1] * w[j + 1]
        s2 += x[j + 2] * w[j + 2]
        s3 += x[j + 3] * w[j + 3]
        s4 += x[j + 4] * w[j + 4]
        s5 += x[j + 5] * w[j + 5]
        s6 += x[j + 6] * w[j + 6]
        s7 += x[j + 7] * w[j + 7]
    for j in range(m, d):
        s0 += x[j] * w[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, fastmath=False, nogil=True)
def _linear_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray, R: np.ndarray) -> float:
    """Fill R (n, 1) with the residuals x.w + b - y; return the summed squared loss."""
    n, d = X.shape
    loss = 0.0
    for i in range(n):
        r = _dot(X[i], w, d) + w[d] - y[i]
        loss += 0.5 * r * r
        R[i, 0] = r
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _logistic_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray, R: np.ndarray) -> float:
    """Fill R (n, 1) with sigmoid(x.w + b) - y; return the summed log-loss."""
    n, d = X.shape
    loss = 0.0
    for i in range(n):
        z = _dot(X[i], w, d) + w[d]
        yi = np.float64(y[i])
        e = math.exp(-abs(z))
        loss += math.log1p(e) + max(z, 0.0) - yi * z
        q = 1.0 / (1.0 + e)
        R[i, 0] = (q if z >= 0.0 else e * q) - yi
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _layer_rows(A: np.ndarray, W: np.ndarray, b: np.ndarray, relu: bool, out: np.ndarray) -> None:
    """Fill out (n, k) with A @ W + b row by row in a fixed order (ReLU'd if relu)."""
    n, d = A.shape
    k = W.shape[1]
    for i in range(n):
        z = out[i]
        for c in range(k):
            z[c] = b[c]
        for j in range(d):
            a = np.float64(A[i, j])
            wj = W[j]
            for c in range(k):
                z[c] += a * wj[c]
        if relu:
            for c in range(k):
                z[c] = max(z[c], 0.0)


@njit(cache=True, fastmath=False, nogil=True)
def _back_rows(D: np.ndarray, W: np.ndarray, A: np.ndarray, out: np.ndarray) -> None:
    """Fill out (n, d) with (D @ W.T) masked by A > 0 (the ReLU derivative), row by row."""
    n, d = A.shape
    k = W.shape[1]
    for i in range(n):
        for j in range(d):
            if A[i, j] > 0.0:
                s = 0.0
                for c in range(k):
                    s += D[i, c] * W[j, c]
                out[i, j] = s
            else:
                out[i, j] = 0.0


@njit(cache=True, fastmath=False, nogil=True)
def _row_bound(U: np.ndarray, V: np.ndarray) -> float:
    """Return max over rows of max(1, max|U_i|) * max|V_i| (bounds every |u*v|); NaN if any is."""
    n, d = U.shape
    k = V.shape[1]
    m = 0.0
    nan = False          # max() drops NaN; a diverged model must not hide behind it
    for i in range(n):
        mu = 1.0
        for j in range(d):
            a = abs(np.float64(U[i, j]))
            nan |= a != a
            mu = max(mu, a)
        mv = 0.0
        for c in range(k):
            a = abs(V[i, c])
            nan |= a != a
            mv = max(mv, a)
        m = max(m, mu * mv)
    return np.nan if nan else m


@njit(cache=True, fastmath=False, nogil=True)
def _fixed_acc(U: np.ndarray, V: np.ndarray, scale: float, acc: np.ndarray) -> None:
    """Add round(u * v * scale) of every row's [U_i, 1] (outer) V_i into acc ((d+1)*k int64)."""
    n, d = U.shape
    k = V.shape[1]
    vs = np.empty(k)
    bias = d * k
    for i in range(n):
        # scale is a power of two, so v * scale is exact and u * (v * scale) rounds once.
        for c in range(k):
            vs[c] = V[i, c] * scale
            acc[bias + c] += round(vs[c])
        for j in range(d):
            u = np.float64(U[i, j])
            base = j * k
            for c in range(k):
                acc[base + c] += round(u * vs[c])


# --------------------------------------------------------------------------- public


def fixed_scale(bound: float, n_rows: int) -> float:
    """Return the power-of-two scale for ``n_rows`` products each at most ``bound`` in size.

    With it, each rounded product is at most 2**(62 - ceil(log2 n_rows)) + 1/2 in size, so
    the int64 sum of ``n_rows`` of them stays below 2**63: overflow cannot happen.
    """
    if not math.isfinite(bound) or bound < 0.0:
        raise ValueError(f"bound must be a finite number >= 0, got {bound}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if bound == 0.0 or n_rows == 0:
        return 1.0
    _, e_bound = math.frexp(bound)          # bound < 2**e_bound
    e = _HEADROOM_BITS - e_bound - (int(n_rows) - 1).bit_length()
    return math.ldexp(1.0, min(e, _MAX_EXPONENT))


def _rows_out(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    cpu._check_rows(X, y)
    return np.empty((X.shape[0], k))


def linear_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, Factors]:
    """Return (summed loss, [(X, residuals (n, 1))]) of linear regression, row by row."""
    R = _rows_out(X, y, 1)
    cpu._check_array(w, "w", np.float64, (X.shape[1] + 1,))
    return float(_linear_rows(X, y, w, R)), [(X, R)]


def logistic_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, Factors]:
    """Return (summed log-loss, [(X, p - y (n, 1))]) of logistic regression, row by row."""
    R = _rows_out(X, y, 1)
    cpu._check_array(w, "w", np.float64, (X.shape[1] + 1,))
    return float(_logistic_rows(X, y, w, R)), [(X, R)]


def softmax_rows(X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int) -> tuple[float, Factors]:
    """Return (summed cross-entropy, [(X, softmax - onehot (n, k))]), row by row."""
    k = cpu._check_k(k)
    Z = _rows_out(X, y, k)
    d = X.shape[1]
    cpu._check_array(W_flat, "W_flat", np.float64, ((d + 1) * k,))
    cpu._check_labels(y, k)
    W = W_flat.reshape(d + 1, k)
    _layer_rows(X, W[:d], W[d], False, Z)
    return float(cpu._softmax_xent_inplace(Z, y)), [(X, Z)]


def mlp_rows(X: np.ndarray, y: np.ndarray, params: np.ndarray, sizes: Sequence[int],
             regression: bool = False) -> tuple[float, Factors]:
    """Return (summed loss, [(layer input, layer delta)] per layer) of a ReLU MLP.

    The loss is cross-entropy over a softmax output, or with ``regression`` 0.5 (f(x) - y)^2
    of one identity output.
    """
    s = tuple(int(v) for v in sizes)
    n, d = cpu._check_rows(X, y)
    if s[0] != d:
        raise ValueError(f"X has {d} columns but sizes[0] is {s[0]}")
    cpu._check_array(params, "params", np.float64, (reference.mlp_param_count(s),))
    if regression and s[-1] != 1:
        raise ValueError(f"a regression MLP has one output unit: sizes must end in 1, got {s}")
    if not regression:
        cpu._check_labels(y, s[-1])
    layers = reference.mlp_unpack(params, s)
    acts: list[np.ndarray] = [X]
    for W, b in layers[:-1]:
        h = np.empty((n, W.shape[1]))
        _layer_rows(acts[-1], W, b, True, h)
        acts.append(h)
    W, b = layers[-1]
    delta = np.empty((n, W.shape[1]))
    _layer_rows(acts[-1], W, b, False, delta)
    if regression:
        loss = float(cpu._squared_residual_inplace(delta, y))
    else:
        loss = float(cpu._softmax_xent_inplace(delta, y))
    deltas = [delta]
    for i in range(len(layers) - 1, 0, -1):
        prev = np.empty_like(acts[i])
        _back_rows(deltas[0], layers[i][0], acts[i], prev)
        deltas.insert(0, prev)
    return loss, list(zip(acts, deltas))


def _check_factor(U: np.ndarray | sparse.CsrBatch, V: np.ndarray) -> None:
    # A CSR U (kernels.sparse) checks its own arrays when it is built.
    for a, name in (((V, "V"),) if isinstance(U, sparse.CsrBatch) else ((U, "U"), (V, "V"))):
        if not isinstance(a, np.ndarray) or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous 2-D numpy array, got {getattr(a, 'shape', a)}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"U has {U.shape[0]} rows but V has {V.shape[0]}")


def row_bound(U: np.ndarray | sparse.CsrBatch, V: np.ndarray) -> float:
    """Return a bound on every |u * v| (and |v|, the bias) of a factor pair (U dense or CSR); NaN if any is."""
    _check_factor(U, V)
    if isinstance(U, sparse.CsrBatch):
        return sparse.csr_row_bound(U, V)
    return float(_row_bound(U, V))


def fixed_accumulate(U: np.ndarray | sparse.CsrBatch, V: np.ndarray, scale: float, acc: np.ndarray) -> None:
    """Add the rows' rounded products u*v*scale into acc (int64, (U.cols + 1) * V.cols); U dense or CSR."""
    _check_factor(U, V)
    size = (U.shape[1] + 1) * V.shape[1]
    if not isinstance(acc, np.ndarray) or acc.dtype != np.int64 or acc.shape != (size,):
        raise ValueError(f"acc must be an int64 array of shape ({size},), got {getattr(acc, 'shape', acc)}")
    if not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ValueError("acc must be a writable C-contiguous array")
    if isinstance(U, sparse.CsrBatch):
        sparse.csr_fixed_accumulate(U, V, scale, acc)   # the same integers: a zero entry rounds to 0
        return
    _fixed_acc(U, V, float(scale), acc)


def warmup() -> None:
    """Compile the kernels for the dtypes training uses, or load them from numba's cache."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 2)).astype(np.float32)
    y = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    w = rng.standard_normal(3)
    for fn in (linear_rows, logistic_rows):
        _, f = fn(X, y, w)
        row_bound(*f[0])
        fixed_accumulate(*f[0], 2.0, np.zeros(3, np.int64))
    _, f = mlp_rows(X, y, rng.standard_normal(reference.mlp_param_count((2, 2, 2))), (2, 2, 2))
    mlp_rows(X, y, rng.standard_normal(reference.mlp_param_count((2, 2, 1))), (2, 2, 1), regression=True)
    for U, V in f:
        row_bound(U, V)
        fixed_accumulate(U, V, 2.0, np.zeros((U.shape[1] + 1) * V.shape[1], np.int64))
