"""SGD and AdaGrad updates in one pass over the parameters: dense (momentum, L2) and on a set of rows.

``sgd_dense`` does what the numpy sequence

    grad = g / batch;  grad += l2 * mask * params          (when l2)
    v *= momentum;  v += grad;  params -= lr * v           (when momentum; else params -= lr * grad)

does, with the same IEEE operations in the same order per element (fastmath off, so no
FMA contraction), hence bitwise the same parameters, without its ~10 passes and 4
temporaries over the vector.

``sgd_rows`` is plain SGD (no momentum, no L2) on the rows of a (d + 1, k) table that a
gradient may be nonzero in: elsewhere the dense update computes ``p - lr * (0.0 / batch)``,
which is ``p`` bit for bit (the gradient there is +0.0: it was zeroed, never summed into),
so updating only those rows gives the dense result.

``adagrad_dense`` / ``adagrad_rows``: ``gi = g / batch (+ l2 * mask * p)``, ``acc += gi * gi``,
``p -= lr * (gi / (sqrt(acc) + eps))``. Where the gradient is +0.0 (and l2 is 0) ``acc``
and ``p`` keep their bits (eps > 0), so the rows version equals the dense one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["adagrad_dense", "adagrad_rows", "clear_rows", "sgd_dense", "sgd_rows", "warmup"]


@njit(cache=True, fastmath=False, nogil=True)
def _dense(p: np.ndarray, g: np.ndarray, batch: float, l2: float, mask: np.ndarray, v: np.ndarray,
           momentum: float, lr: float) -> None:
    for i in range(p.size):
        gi = g[i] / batch
        if l2 != 0.0:
            gi = gi + l2 * mask[i] * p[i]    # numpy's (l2 * mask) * params, then the add
        if momentum != 0.0:
            vi = v[i] * momentum + gi
            v[i] = vi
            p[i] = p[i] - lr * vi
        else:
            p[i] = p[i] - lr * gi


@njit(cache=True, fastmath=False, nogil=True)
def _rows(p: np.ndarray, g: np.ndarray, rows: np.ndarray, k: int, d: int, batch: float, lr: float) -> None:
    for t in range(rows.size + 1):
        base = (np.int64(rows[t]) if t < rows.size else np.int64(d)) * k    # the bias row d last
        for c in range(base, base + k):
            p[c] = p[c] - lr * (g[c] / batch)


@njit(cache=True, fastmath=False, nogil=True)
def _adagrad_dense(p: np.ndarray, g: np.ndarray, batch: float, l2: float, mask: np.ndarray, acc: np.ndarray,
                   lr: float, eps: float) -> None:
    for i in range(p.size):
        gi = g[i] / batch
        if l2 != 0.0:
            gi = gi + l2 * mask[i] * p[i]
        a = acc[i] + gi * gi
        acc[i] = a
        p[i] = p[i] - lr * (gi / (math.sqrt(a) + eps))


@njit(cache=True, fastmath=False, nogil=True)
def _adagrad_rows(p: np.ndarray, g: np.ndarray, rows: np.ndarray, k: int, d: int, batch: float, acc: np.ndarray,
                  lr: float, eps: float) -> None:
    for t in range(rows.size + 1):
        base = (np.int64(rows[t]) if t < rows.size else np.int64(d)) * k
        for c in range(base, base + k):
            gi = g[c] / batch
            a = acc[c] + gi * gi
            acc[c] = a
            p[c] = p[c] - lr * (gi / (math.sqrt(a) + eps))


@njit(cache=True, nogil=True)
def _clear(g: np.ndarray, rows: np.ndarray, k: int, d: int) -> None:
    for t in range(rows.size + 1):
        base = (np.int64(rows[t]) if t < rows.size else np.int64(d)) * k
        for c in range(base, base + k):
            g[c] = 0.0


def clear_rows(g: np.ndarray, rows: np.ndarray, k: int) -> None:
    """Set rows ``rows`` and the bias row d of a flat (d + 1, k) table ``g`` to +0.0."""
    _clear(g, rows, int(k), g.size // k - 1)


def sgd_dense(params: np.ndarray, g: np.ndarray, batch: int, l2: float, mask: np.ndarray, velocity: np.ndarray,
              momentum: float, lr: float) -> None:
    """Update ``params`` (and ``velocity`` when momentum) in place from gradient sum ``g`` over ``batch`` rows."""
    _dense(params, g, float(batch), float(l2), mask, velocity, float(momentum), float(lr))


def sgd_rows(params: np.ndarray, g: np.ndarray, rows: np.ndarray, k: int, batch: int, lr: float) -> None:
    """Plain SGD on rows ``rows`` (int, of a (d + 1, k) table; d = params.size // k - 1) and the bias row d."""
    _rows(params, g, rows, int(k), params.size // k - 1, float(batch), float(lr))


def adagrad_dense(params: np.ndarray, g: np.ndarray, batch: int, l2: float, mask: np.ndarray, acc: np.ndarray,
                  lr: float, eps: float) -> None:
    """AdaGrad step in place on ``params`` and accumulator ``acc`` from gradient sum ``g`` over ``batch`` rows."""
    _adagrad_dense(params, g, float(batch), float(l2), mask, acc, float(lr), float(eps))


def adagrad_rows(params: np.ndarray, g: np.ndarray, rows: np.ndarray, k: int, batch: int, acc: np.ndarray,
                 lr: float, eps: float) -> None:
    """AdaGrad without L2 on rows ``rows`` and the bias row of a (d + 1, k) table (see ``sgd_rows``)."""
    _adagrad_rows(params, g, rows, int(k), params.size // k - 1, float(batch), acc, float(lr), float(eps))


def warmup(kind: str | None = None) -> None:
    """Compile the updates for float64 parameters and int32 rows, or load them from numba's cache.

    ``kind`` 'sgd' or 'adagrad': only that optimizer's dense update (what a dense batch's step
    calls; a rank loads it before its first step, where the load cost 4.7-6.2 ms of the step).
    """
    p, g, m = np.zeros(4), np.zeros(4), np.ones(4)
    if kind in (None, "sgd"):
        sgd_dense(p, g, 2, 0.1, m, np.zeros(4), 0.9, 0.1)
    if kind in (None, "adagrad"):
        adagrad_dense(p, g, 2, 0.1, m, np.zeros(4), 0.1, 1e-10)
    if kind is None:
        sgd_rows(p, g, np.array([0], np.int32), 2, 2, 0.1)
        clear_rows(g, np.array([0], np.int32), 2)
        adagrad_rows(p, g, np.array([0], np.int32), 2, 2, np.zeros(4), 0.1, 1e-10)
