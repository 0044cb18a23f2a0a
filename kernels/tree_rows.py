"""Per-row tree kernels: cut points, uint8 binning, gradients, fixed-point rounding, prediction.

What a tree learner does to rows rather than to histograms (kernels.trees holds the
histogram, split and level kernels):

* ``cut_points`` turns a sample of rows into at most ``bins - 1`` float32 cuts per
  feature; ``bin_rows`` maps float32 rows to uint8 codes, ``code = #{cuts < x}``.
* ``grad_*`` give each loss's per-row gradient and hessian; ``quantize`` rounds them once
  per row to int64 at a power-of-two scale from global ``bounds`` (as kernels.exact does),
  so a histogram is an integer sum: the same for any split of rows over ranks.
* ``predict_raw`` walks raw float32 rows through an ensemble stored as flat node arrays.

Every kernel is plain numba, fastmath off: results depend on the inputs only.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "MAX_BINS",
    "bin_rows",
    "bounds",
    "cut_points",
    "feature_offsets",
    "grad_logistic",
    "grad_softmax",
    "grad_squared",
    "pair",
    "predict_raw",
    "quantize",
    "quantize_pair",
]

MAX_BINS = 256          # codes are uint8


# --------------------------------------------------------------------------- bins


def cut_points(sample: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (cuts (d, bins-1) float32 padded with +inf, ncuts (d,) int32) from sample rows.

    A feature with at most ``bins`` distinct values gets a cut at each distinct value but
    the largest (every value its own bin); otherwise the cuts are the distinct values at
    the sample's k/bins quantiles (k = 1 .. bins-1), less the largest value. A constant
    feature has no cut. The result depends on the sample's values only, not its row order.
    """
    if not 2 <= int(bins) <= MAX_BINS:
        raise ValueError(f"bins must be in 2..{MAX_BINS}, got {bins}")
    if not isinstance(sample, np.ndarray) or sample.ndim != 2 or sample.shape[0] == 0:
        raise ValueError(f"sample must be a 2-D array with at least one row, got {getattr(sample, 'shape', sample)}")
    S = np.asarray(sample, dtype=np.float32)
    if not np.isfinite(S).all():
        r, c = np.argwhere(~np.isfinite(S))[0]
        raise ValueError(f"sample row {r}, feature {c} is {S[r, c]}; cut points need finite values")
    m, d = S.shape
    bins = int(bins)
    cuts = np.full((d, bins - 1), np.inf, dtype=np.float32)
    ncuts = np.zeros(d, dtype=np.int32)
    qidx = (np.arange(1, bins, dtype=np.int64) * m) // bins
    for f in range(d):
        v = np.sort(S[:, f])
        u = np.unique(v)
        if u.size <= bins:
            c = u[:-1]
        else:
            c = np.unique(v[qidx])
            c = c[c < u[-1]]
        cuts[f, : c.size] = c
        ncuts[f] = c.size
    return cuts, ncuts


def feature_offsets(ncuts: np.ndarray) -> np.ndarray:
    """Return (d + 1,) int64 offsets of each feature's ncuts + 1 bins in a flat histogram."""
    off = np.zeros(ncuts.size + 1, dtype=np.int64)
    np.cumsum(ncuts.astype(np.int64) + 1, out=off[1:])
    return off


@njit(cache=True, nogil=True)
def _bin_rows(X: np.ndarray, cuts: np.ndarray, ncuts: np.ndarray, out: np.ndarray) -> int:
    """Fill out (n, d) uint8 with #{cuts < x}; return the first row holding NaN, or -1."""
    n, d = X.shape
    for i in range(n):
        for f in range(d):
            x = X[i, f]
            if x != x:
                return i
            lo = 0
            hi = ncuts[f]
            c = cuts[f]
            while lo < hi:             # first cut >= x
                mid = (lo + hi) >> 1
                if c[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid
            out[i, f] = lo
    return -1


def bin_rows(X: np.ndarray, cuts: np.ndarray, ncuts: np.ndarray) -> np.ndarray:
    """Return (n, d) uint8 codes of float32 rows: values above every cut get the last bin."""
    if not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != cuts.shape[0]:
        raise ValueError(f"X must be 2-D with {cuts.shape[0]} columns, got {getattr(X, 'shape', X)}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    out = np.empty(X.shape, dtype=np.uint8)
    bad = _bin_rows(X, cuts, ncuts, out)
    if bad >= 0:
        f = int(np.flatnonzero(np.isnan(X[bad]))[0])
        raise ValueError(f"row {bad}, feature {f} is NaN; tree inputs must be finite")
    return out


# --------------------------------------------------------------------------- gradients


@njit(cache=True, nogil=True)
def _grad_squared(pred: np.ndarray, y: np.ndarray, g: np.ndarray, h: np.ndarray) -> float:
    n = pred.shape[0]
    loss = 0.0
    for i in range(n):
        r = pred[i] - np.float64(y[i])
        g[i] = r
        h[i] = 1.0
        loss += 0.5 * r * r
    return loss


@njit(cache=True, nogil=True)
def _grad_logistic(pred: np.ndarray, y: np.ndarray, g: np.ndarray, h: np.ndarray) -> float:
    n = pred.shape[0]
    loss = 0.0
    for i in range(n):
        z = pred[i]
        yi = np.float64(y[i])
        e = math.exp(-abs(z))
        q = 1.0 / (1.0 + e)
        p = q if z >= 0.0 else e * q
        loss += math.log1p(e) + max(z, 0.0) - yi * z
        g[i] = p - yi
        h[i] = max(p * (1.0 - p), 1e-16)
    return loss


@njit(cache=True, nogil=True)
def _grad_softmax(pred: np.ndarray, y: np.ndarray, g: np.ndarray, h: np.ndarray) -> float:
    n, k = pred.shape
    factor = k / (k - 1.0)          # LightGBM's: the diagonal of the softmax Hessian, rescaled
    loss = 0.0
    e = np.empty(k)                 # each exp once (it was taken twice a class)
    for i in range(n):
        m = pred[i, 0]
        for c in range(1, k):
            m = max(m, pred[i, c])
        s = 0.0
        for c in range(k):
            e[c] = math.exp(pred[i, c] - m)
            s += e[c]
        yi = int(y[i])
        loss += math.log(s) + m - pred[i, yi]
        for c in range(k):
            p = e[c] / s
            g[c, i] = p - (1.0 if c == yi else 0.0)
            h[c, i] = max(factor * p * (1.0 - p), 1e-16)
    return loss


def grad_squared(pred: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (summed 0.5 (pred - y)^2, g (n,), h (n,)) of squared error."""
    g, h = np.empty(pred.shape[0]), np.empty(pred.shape[0])
    return float(_grad_squared(pred, y, g, h)), g, h


def grad_logistic(pred: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (summed log-loss, g (n,), h (n,)) of logistic loss on raw scores pred."""
    g, h = np.empty(pred.shape[0]), np.empty(pred.shape[0])
    return float(_grad_logistic(pred, y, g, h)), g, h


def grad_softmax(pred: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (summed cross-entropy, g (k, n), h (k, n)) of softmax on raw scores pred (n, k)."""
    n, k = pred.shape
    g, h = np.empty((k, n)), np.empty((k, n))
    return float(_grad_softmax(pred, y, g, h)), g, h


def quantize(v: np.ndarray, scale: float) -> np.ndarray:
    """Return round(v * scale) as int64 (half to even); scale is a power of two."""
    return np.rint(v * scale).astype(np.int64)


def pair(gq: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """Return (n, 2) int64 rows (gq, hq) interleaved, the layout the histogram kernels read."""
    gh = np.empty((gq.shape[0], 2), np.int64)
    gh[:, 0] = gq
    gh[:, 1] = hq
    return gh


def quantize_pair(g: np.ndarray, h: np.ndarray, sg: float, sh: float, out: np.ndarray) -> np.ndarray:
    """Fill out (n, 2) int64 with (quantize(g, sg), quantize(h, sh)) per row; return it."""
    _quantize_pair(g, h, float(sg), float(sh), out)
    return out


@njit(cache=True, nogil=True)
def _quantize_pair(g: np.ndarray, h: np.ndarray, sg: float, sh: float, out: np.ndarray) -> None:
    for i in range(g.shape[0]):
        out[i, 0] = np.int64(np.rint(g[i] * sg))
        out[i, 1] = np.int64(np.rint(h[i] * sh))


@njit(cache=True, nogil=True)
def _bounds(g: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    bg = 0.0
    bh = 0.0
    for i in range(g.shape[0]):
        bg = max(bg, abs(g[i]))
        bh = max(bh, h[i])
    return bg, bh


def bounds(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Return [max |g|, max h] (zeros when empty; h >= 0): the local bounds of a tree's fixed-point scales."""
    return np.array(_bounds(g, h))


# --------------------------------------------------------------------------- prediction


@njit(cache=True, nogil=True)
def _predict(X: np.ndarray, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
             value: np.ndarray, offsets: np.ndarray, tree_class: np.ndarray, out: np.ndarray) -> None:
    n = X.shape[0]
    for i in range(n):
        x = X[i]
        for t in range(offsets.shape[0] - 1):
            base = offsets[t]
            node = base
            while feature[node] >= 0:
                if x[feature[node]] <= threshold[node]:
                    node = base + left[node]
                else:
                    node = base + right[node]
            out[i, tree_class[t]] += value[node]


def predict_raw(X: np.ndarray, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                value: np.ndarray, offsets: np.ndarray, tree_class: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Return raw scores (n, classes) of float32 rows: base plus every tree's leaf for its class.

    Node arrays are flat over trees; tree t owns nodes offsets[t]:offsets[t+1], its root
    first, left/right indices relative to its root; a leaf has feature -1. A row goes
    left where x[feature] <= threshold (the float32 cut), as bin_rows would bin it.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    out = np.empty((X.shape[0], base.size))
    out[:] = base
    _predict(X, feature, threshold, left, right, value, offsets, tree_class, out)
    return out
