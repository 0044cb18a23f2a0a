"""Loss, gradient sums and predictions of linear models on CSR rows, in time ~ nnz * k.

A ``CsrBatch`` holds n rows of a sparse matrix: ``indptr`` int64 (n + 1, starting at 0),
``indices`` int32 (column ids, sorted and unique within each row), ``data`` float32 and
the column count ``d``. Parameters stay dense and laid out as in ``kernels.reference``
(linear / logistic: ``w[:d]``, bias ``w[d]``; softmax: row-major ``(d + 1, k)``). Every
gradient kernel writes the dense sum into ``g``: only the rows' columns and the biases
can be nonzero, which is what ``fleetmpi.sync.sparse`` sends.

The ``*_rows`` kernels give the per-row factors of ``kernels.exact`` with a CSR ``U``:
each row's logits are summed in its index order with fastmath off, so a row's factors
never depend on the other rows of its batch, and ``csr_fixed_accumulate`` adds exactly
the integers the dense ``kernels.exact.fixed_accumulate`` would (a zero entry rounds to 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from kernels import cpu

__all__ = [
    "CsrBatch",
    "csr_fixed_accumulate",
    "csr_row_bound",
    "linear_grad",
    "linear_predict",
    "linear_rows",
    "logistic_grad",
    "logistic_predict_proba",
    "logistic_rows",
    "mark_columns",
    "softmax_eval",
    "softmax_grad",
    "softmax_predict_proba",
    "softmax_rows",
    "warmup",
]


@dataclass(frozen=True)
class CsrBatch:
    """n sparse rows of d columns: indptr int64 (n+1, from 0), indices int32, data float32."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    d: int

    def __post_init__(self) -> None:
        ip, ix, dv = self.indptr, self.indices, self.data
        for a, name, dtype in ((ip, "indptr", np.int64), (ix, "indices", np.int32), (dv, "data", np.float32)):
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != dtype or not a.flags.c_contiguous:
                raise TypeError(f"CsrBatch.{name} must be a C-contiguous 1-D {np.dtype(dtype).name} array, "
                                f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        if ip.size < 1 or ip[0] != 0 or ip[-1] != ix.size or ix.size != dv.size:
            raise ValueError(f"CsrBatch: indptr must start at 0 and end at nnz={ix.size} (= data size {dv.size}), "
                             f"got indptr[0]={ip[0] if ip.size else None}, indptr[-1]={ip[-1] if ip.size else None}")
        if self.d < 0:
            raise ValueError(f"CsrBatch: d must be >= 0, got {self.d}")

    @property
    def shape(self) -> tuple[int, int]:
        """Return (rows, columns)."""
        return self.indptr.size - 1, self.d

    @property
    def nnz(self) -> int:
        """Return the count of stored entries."""
        return int(self.indices.size)

    def copy(self) -> CsrBatch:
        """Return a batch with its own copies of the arrays (a reader's batch is a view into
        buffers its next read overwrites)."""
        return CsrBatch(self.indptr.copy(), self.indices.copy(), self.data.copy(), self.d)

    def toarray(self) -> np.ndarray:
        """Return the rows as a dense float32 (n, d) array (tests and small batches)."""
        n = self.shape[0]
        out = np.zeros((n, self.d), np.float32)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        out[rows, self.indices] = self.data
        return out

    @classmethod
    def from_dense(cls, X: np.ndarray) -> CsrBatch:
        """Return the nonzeros of a dense (n, d) array as a batch (row-major, sorted columns)."""
        X = np.asarray(X, np.float32)
        rows, cols = np.nonzero(X)
        indptr = np.zeros(X.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=X.shape[0]), out=indptr[1:])
        return cls(indptr, cols.astype(np.int32), np.ascontiguousarray(X[rows, cols]), X.shape[1])


# --------------------------------------------------------------------------- kernels


@njit(cache=True, fastmath=False, nogil=True)
def _row_dot(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, i: int, w: np.ndarray) -> float:
    """Return sum over row i's entries of data * w[col], in index order."""
    s = 0.0
    for p in range(ip[i], ip[i + 1]):
        s += np.float64(dv[p]) * w[ix[p]]
    return s


@njit(cache=True, fastmath=False, nogil=True)
def _linear_grad(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, y: np.ndarray, w: np.ndarray,
                 d: int, logistic: bool, g: np.ndarray, zero: bool) -> float:
    """Fill g (d+1,) with the squared-error (or log-loss) gradient sum (zeroing it first if ``zero``); return the loss sum."""
    if zero:
        g[:] = 0.0
    loss = 0.0
    gb = 0.0
    for i in range(ip.size - 1):
        z = _row_dot(ip, ix, dv, i, w) + w[d]
        yi = np.float64(y[i])
        if logistic:
            e = math.exp(-abs(z))
            loss += math.log1p(e) + max(z, 0.0) - yi * z
            q = 1.0 / (1.0 + e)
            r = (q if z >= 0.0 else e * q) - yi
        else:
            r = z - yi
            loss += 0.5 * r * r
        gb += r
        for p in range(ip[i], ip[i + 1]):
            g[ix[p]] += r * dv[p]
    g[d] = gb
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _linear_rows(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, y: np.ndarray, w: np.ndarray,
                 d: int, logistic: bool, R: np.ndarray) -> float:
    """Fill R (n, 1) with each row's residual (x.w + b - y, or sigmoid - y); return the loss sum."""
    loss = 0.0
    for i in range(ip.size - 1):
        z = _row_dot(ip, ix, dv, i, w) + w[d]
        yi = np.float64(y[i])
        if logistic:
            e = math.exp(-abs(z))
            loss += math.log1p(e) + max(z, 0.0) - yi * z
            q = 1.0 / (1.0 + e)
            R[i, 0] = (q if z >= 0.0 else e * q) - yi
        else:
            R[i, 0] = z - yi
            loss += 0.5 * R[i, 0] * R[i, 0]
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _logits(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, W: np.ndarray, d: int, Z: np.ndarray) -> None:
    """Fill Z (n, k) with each row's logits b + sum data * W[col], in index order."""
    k = W.shape[1]
    for i in range(ip.size - 1):
        z = Z[i]
        for c in range(k):
            z[c] = W[d, c]
        for p in range(ip[i], ip[i + 1]):
            a = np.float64(dv[p])
            wj = W[ix[p]]
            for c in range(k):
                z[c] += a * wj[c]


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_grad(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, y: np.ndarray, W: np.ndarray,
                  d: int, G: np.ndarray, zero: bool) -> float:
    """Fill G (d+1, k) with the softmax cross-entropy gradient sum (zeroing it first if ``zero``); return the loss sum."""
    k = W.shape[1]
    if zero:
        G[:, :] = 0.0
    z = np.empty(k)
    loss = 0.0
    for i in range(ip.size - 1):
        for c in range(k):
            z[c] = W[d, c]
        for p in range(ip[i], ip[i + 1]):
            a = np.float64(dv[p])
            wj = W[ix[p]]
            for c in range(k):
                z[c] += a * wj[c]
        loss += cpu._softmax_residual(z, int(y[i]))
        for p in range(ip[i], ip[i + 1]):
            a = np.float64(dv[p])
            gj = G[ix[p]]
            for c in range(k):
                gj[c] += z[c] * a
        for c in range(k):
            G[d, c] += z[c]
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_proba(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, W: np.ndarray, d: int, out: np.ndarray) -> None:
    """Fill out (n, k) with softmax probabilities of each row's logits."""
    _logits(ip, ix, dv, W, d, out)
    k = W.shape[1]
    for i in range(out.shape[0]):
        z = out[i]
        m = z[0]
        for c in range(1, k):
            m = max(m, z[c])
        s = 0.0
        for c in range(k):
            z[c] = math.exp(z[c] - m)
            s += z[c]
        for c in range(k):
            z[c] /= s


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_eval(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, y: np.ndarray, W: np.ndarray,
                  d: int) -> tuple[float, int]:
    """Return (cross-entropy sum, rows whose most probable class is the label): one forward pass.

    The loss adds what ``_softmax_grad`` adds and the class is numpy's argmax of what
    ``_softmax_proba`` gives (first of equal maxima; a NaN wins), so both match bit for bit.
    """
    k = W.shape[1]
    zi = np.empty(k)
    p = np.empty(k)
    loss = 0.0
    correct = 0
    for i in range(ip.size - 1):
        for c in range(k):          # the logits as _logits sums them
            zi[c] = W[d, c]
        for q in range(ip[i], ip[i + 1]):
            a = np.float64(dv[q])
            wj = W[ix[q]]
            for c in range(k):
                zi[c] += a * wj[c]
        m = zi[0]
        for c in range(1, k):
            m = max(m, zi[c])
        s = 0.0
        for c in range(k):
            p[c] = math.exp(zi[c] - m)
            s += p[c]
        best = 0
        for c in range(k):
            p[c] /= s
            if p[best] != p[best]:
                continue
            if p[c] != p[c] or p[c] > p[best]:
                best = c
        label = int(y[i])
        loss += cpu._softmax_residual(zi, label)
        if best == label:
            correct += 1
    return loss, correct


@njit(cache=True, fastmath=False, nogil=True)
def _row_bound(ip: np.ndarray, dv: np.ndarray, V: np.ndarray) -> float:
    """Return max over rows of max(1, max|x_i|) * max|V_i|; NaN if any entry is."""
    k = V.shape[1]
    m = 0.0
    nan = False          # max() drops NaN; a diverged model must not hide behind it
    for i in range(ip.size - 1):
        mu = 1.0
        for p in range(ip[i], ip[i + 1]):
            a = abs(np.float64(dv[p]))
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
def _fixed_acc(ip: np.ndarray, ix: np.ndarray, dv: np.ndarray, d: int, V: np.ndarray, scale: float,
               acc: np.ndarray) -> None:
    """Add round(x * v * scale) of every row's [x_i, 1] (outer) V_i into acc ((d+1)*k int64)."""
    k = V.shape[1]
    vs = np.empty(k)
    bias = d * k
    for i in range(ip.size - 1):
        # scale is a power of two: v * scale is exact, u * (v * scale) rounds once (as kernels.exact).
        for c in range(k):
            vs[c] = V[i, c] * scale
            acc[bias + c] += round(vs[c])
        for p in range(ip[i], ip[i + 1]):
            u = np.float64(dv[p])
            base = np.int64(ix[p]) * k
            for c in range(k):
                acc[base + c] += round(u * vs[c])


@njit(cache=True, nogil=True)
def _mark(ix: np.ndarray, seen: np.ndarray, out: np.ndarray) -> int:
    """Write the distinct column ids of ix into out in first-seen order; return their count.

    ``seen`` (bool, d) must be all False on entry and is all False again on return.
    """
    m = 0
    for p in range(ix.size):
        j = ix[p]
        if not seen[j]:
            seen[j] = True
            out[m] = j
            m += 1
    for t in range(m):
        seen[out[t]] = False
    return m


# --------------------------------------------------------------------------- public


def _check(X: CsrBatch, y: np.ndarray | None, w: np.ndarray, size: int, name: str) -> None:
    if not isinstance(X, CsrBatch):
        raise TypeError(f"X must be a CsrBatch, got {type(X).__name__}")
    if y is not None:
        cpu._check_array(y, "y", np.float32, (X.shape[0],))
    cpu._check_array(w, name, np.float64, (size,))


# ``zeroed``: g_out is already all zero (a caller that cleared the rows the last batch wrote,
# ``fleetmpi.sync.base.CsrGrad``); the kernels add into it instead of clearing it all.


def linear_grad(X: CsrBatch, y: np.ndarray, w: np.ndarray, g_out: np.ndarray, zeroed: bool = False) -> float:
    """Fill g_out ((d+1,) float64) with the squared-error gradient sum over CSR rows; return the loss sum."""
    _check(X, y, w, X.d + 1, "w")
    cpu._check_out(g_out, "g_out", (X.d + 1,))
    return float(_linear_grad(X.indptr, X.indices, X.data, y, w, X.d, False, g_out, not zeroed))


def logistic_grad(X: CsrBatch, y: np.ndarray, w: np.ndarray, g_out: np.ndarray, zeroed: bool = False) -> float:
    """Fill g_out ((d+1,) float64) with the log-loss gradient sum over CSR rows; return the loss sum."""
    _check(X, y, w, X.d + 1, "w")
    cpu._check_out(g_out, "g_out", (X.d + 1,))
    return float(_linear_grad(X.indptr, X.indices, X.data, y, w, X.d, True, g_out, not zeroed))


def softmax_grad(X: CsrBatch, y: np.ndarray, W_flat: np.ndarray, k: int, g_out: np.ndarray,
                 zeroed: bool = False) -> float:
    """Fill g_out (((d+1)*k,) float64) with the cross-entropy gradient sum over CSR rows; return the loss sum."""
    k = cpu._check_k(k)
    _check(X, y, W_flat, (X.d + 1) * k, "W_flat")
    cpu._check_out(g_out, "g_out", ((X.d + 1) * k,))
    cpu._check_labels(y, k)
    W = W_flat.reshape(X.d + 1, k)
    return float(_softmax_grad(X.indptr, X.indices, X.data, y, W, X.d, g_out.reshape(X.d + 1, k), not zeroed))


def softmax_eval(X: CsrBatch, y: np.ndarray, W_flat: np.ndarray, k: int) -> tuple[float, float]:
    """Return (cross-entropy sum, count of rows predicted right) over CSR rows, without a gradient buffer."""
    k = cpu._check_k(k)
    _check(X, y, W_flat, (X.d + 1) * k, "W_flat")
    cpu._check_labels(y, k)
    loss, correct = _softmax_eval(X.indptr, X.indices, X.data, y, W_flat.reshape(X.d + 1, k), X.d)
    return float(loss), float(correct)


def linear_predict(X: CsrBatch, w: np.ndarray) -> np.ndarray:
    """Return x.w + b per CSR row, float64 (n,)."""
    _check(X, None, w, X.d + 1, "w")
    R = np.empty((X.shape[0], 1))
    _linear_rows(X.indptr, X.indices, X.data, np.zeros(X.shape[0], np.float32), w, X.d, False, R)
    return R[:, 0].copy()


def logistic_predict_proba(X: CsrBatch, w: np.ndarray) -> np.ndarray:
    """Return P(y = 1) per CSR row, float64 (n,)."""
    _check(X, None, w, X.d + 1, "w")
    R = np.empty((X.shape[0], 1))
    _linear_rows(X.indptr, X.indices, X.data, np.zeros(X.shape[0], np.float32), w, X.d, True, R)
    return R[:, 0].copy()


def softmax_predict_proba(X: CsrBatch, W_flat: np.ndarray, k: int) -> np.ndarray:
    """Return class probabilities per CSR row, float64 (n, k)."""
    k = cpu._check_k(k)
    _check(X, None, W_flat, (X.d + 1) * k, "W_flat")
    out = np.empty((X.shape[0], k))
    _softmax_proba(X.indptr, X.indices, X.data, W_flat.reshape(X.d + 1, k), X.d, out)
    return out


def linear_rows(X: CsrBatch, y: np.ndarray, w: np.ndarray) -> tuple[float, list[tuple[CsrBatch, np.ndarray]]]:
    """Return (summed squared loss, [(X, residuals (n, 1))]) row by row, for sync: exact."""
    _check(X, y, w, X.d + 1, "w")
    R = np.empty((X.shape[0], 1))
    return float(_linear_rows(X.indptr, X.indices, X.data, y, w, X.d, False, R)), [(X, R)]


def logistic_rows(X: CsrBatch, y: np.ndarray, w: np.ndarray) -> tuple[float, list[tuple[CsrBatch, np.ndarray]]]:
    """Return (summed log-loss, [(X, p - y (n, 1))]) row by row, for sync: exact."""
    _check(X, y, w, X.d + 1, "w")
    R = np.empty((X.shape[0], 1))
    return float(_linear_rows(X.indptr, X.indices, X.data, y, w, X.d, True, R)), [(X, R)]


def softmax_rows(X: CsrBatch, y: np.ndarray, W_flat: np.ndarray,
                 k: int) -> tuple[float, list[tuple[CsrBatch, np.ndarray]]]:
    """Return (summed cross-entropy, [(X, softmax - onehot (n, k))]) row by row, for sync: exact."""
    k = cpu._check_k(k)
    _check(X, y, W_flat, (X.d + 1) * k, "W_flat")
    cpu._check_labels(y, k)
    Z = np.empty((X.shape[0], k))
    _logits(X.indptr, X.indices, X.data, W_flat.reshape(X.d + 1, k), X.d, Z)
    return float(cpu._softmax_xent_inplace(Z, y)), [(X, Z)]


def csr_row_bound(U: CsrBatch, V: np.ndarray) -> float:
    """Return a bound on every |x * v| (and |v|, the bias) of a CSR factor pair; NaN if any is."""
    return float(_row_bound(U.indptr, U.data, V))


def csr_fixed_accumulate(U: CsrBatch, V: np.ndarray, scale: float, acc: np.ndarray) -> None:
    """Add the CSR rows' rounded products x*v*scale into acc (int64, (d + 1) * V.cols); no checks."""
    _fixed_acc(U.indptr, U.indices, U.data, U.d, V, float(scale), acc)


def mark_columns(indices: np.ndarray, seen: np.ndarray, out: np.ndarray) -> int:
    """Write the distinct ids of ``indices`` (int32) into ``out`` (int32); return the count.

    ``seen`` is a bool scratch of the column count, all False on entry and on return, so a
    call costs ~ len(indices), not the column count.
    """
    return int(_mark(indices, seen, out))


def warmup() -> None:
    """Compile the kernels for the dtypes training uses, or load them from numba's cache."""
    X = CsrBatch(np.array([0, 1, 1], np.int64), np.array([1], np.int32), np.array([0.5], np.float32), 2)
    y = np.array([0.0, 1.0], np.float32)
    w = np.array([0.1, -0.2, 0.3])
    g = np.empty(3)
    linear_grad(X, y, w, g)
    logistic_grad(X, y, w, g)
    softmax_grad(X, y, np.arange(6, dtype=np.float64), 2, np.empty(6))
    softmax_eval(X, y, np.arange(6, dtype=np.float64), 2)
    _, f = softmax_rows(X, y, np.arange(6, dtype=np.float64), 2)
    csr_row_bound(*f[0])
    csr_fixed_accumulate(*f[0], 2.0, np.zeros(6, np.int64))
    _, f = linear_rows(X, y, w)
    csr_row_bound(*f[0])
    csr_fixed_accumulate(*f[0], 2.0, np.zeros(3, np.int64))
    mark_columns(X.indices, np.zeros(2, np.bool_), np.empty(1, np.int32))
