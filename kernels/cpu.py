"""Compute loss and gradient sums and predictions on one CPU thread with numba.

Same conventions as ``kernels.reference`` (X float32 C-contiguous (n, d), y float32
(n,), flat float64 parameters, gradient *sums*). linear, logistic and softmax are fused
single passes: each row's logit, residual and gradient contribution are computed while
the row is in L1. Numba compiles on first call (or loads its on-disk cache); call
``warmup()`` before timing-sensitive work.

The linear and logistic kernels are in ``kernels.cpu_glm`` (what they do to approach the
read rate is described there), the softmax ones in ``kernels.cpu_softmax`` (eight-row
blocks towards the FMA peak); their public, checked entry points are here.

The public functions check shapes and dtypes in O(1) (plus one O(n) label range check
for class labels, which keeps the kernels from indexing out of bounds) and call the
raw ``_*`` kernels, which do no checking at all.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels import num_threads

# The linear / logistic kernels live in kernels.cpu_glm, the softmax ones in
# kernels.cpu_softmax; the names below are imported here so that ``cpu._glm_grad``,
# ``cpu._softmax_residual`` (kernels.sparse) etc. keep working and warmup sees them.
from kernels.cpu_glm import (
    _CHUNK_MIN_ROWS,
    _glm_grad,
    _glm_grad_threads,
)
from kernels.cpu_softmax import (
    _softmax_grad,
    _softmax_grad_threads,
    _softmax_predict_proba,
    _softmax_residual,
)

__all__ = [
    "linear_grad",
    "linear_predict",
    "logistic_grad",
    "logistic_predict_proba",
    "softmax_grad",
    "softmax_predict_proba",
    "warmup",
]


# --------------------------------------------------------------------------- kernels


@njit(cache=True, fastmath={"reassoc"}, nogil=True)
def _dot(x: np.ndarray, w: np.ndarray, d: int) -> float:
    """Return sum_j x[j] * w[j] over j < d in float64."""
    # Reassociation lets LLVM vectorise this reduction (~1.8x over eight scalar chains).
    # The order then follows the node's vector width, so results may differ in the last
    # bits between AVX2 and AVX-512 nodes: fine for dense sync (float sums across ranks
    # reorder anyway); sync kind 'exact' does not rely on this kernel's rounding.
    s = 0.0
    for j in range(d):
        s += x[j] * w[j]
    return s


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_xent_inplace(Z: np.ndarray, y: np.ndarray) -> float:
    """Replace logits Z (n, k) by softmax(Z) - onehot(y); return the summed loss.

    Row by row in a fixed order without fastmath: kernels.exact relies on that rounding.
    """
    loss = 0.0
    for i in range(Z.shape[0]):
        loss += _softmax_residual(Z[i], int(y[i]))
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _squared_residual_inplace(Z: np.ndarray, y: np.ndarray) -> float:
    """Replace outputs Z (n, 1) by residuals Z - y in place; return the summed 0.5 * residual^2."""
    loss = 0.0
    for i in range(Z.shape[0]):
        r = Z[i, 0] - np.float64(y[i])
        Z[i, 0] = r
        loss += 0.5 * r * r
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _linear_predict(X: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Fill out (n,) with x.w + b."""
    n, d = X.shape
    b = w[d]
    for i in range(n):
        out[i] = _dot(X[i], w, d) + b


@njit(cache=True, fastmath=False, nogil=True)
def _logistic_predict_proba(X: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Fill out (n,) with sigmoid(x.w + b)."""
    n, d = X.shape
    b = w[d]
    for i in range(n):
        z = _dot(X[i], w, d) + b
        e = math.exp(-abs(z))
        q = 1.0 / (1.0 + e)
        out[i] = q if z >= 0.0 else e * q


# --------------------------------------------------------------------------- checks


@njit(cache=True, nogil=True)
def _first_label_outside(y: np.ndarray, k: float) -> int:
    """Return the index of the first label not in [0, k) (NaN counts as outside), or -1."""
    for i in range(y.size):
        v = y[i]
        if not (v >= 0.0 and v < k):
            return i
    return -1


def labels_within(y: np.ndarray, k: int) -> bool:
    """Return whether every label of a float32 batch is in [0, k): one pass, where numpy's
    min and max took two (3 us a step at batch 256). Not NaN either (min/max let NaN by)."""
    return bool(_first_label_outside(y, float(k)) < 0)


def _check_array(a: np.ndarray, name: str, dtype: type, shape: tuple[int, ...]) -> None:
    """Raise TypeError / ValueError unless a is C-contiguous of dtype and shape."""
    # The usual case in one expression (a kernel call checks 4 arrays a step): an ndarray
    # compared with a dtype object, not a scalar type, which numpy would convert each time.
    if type(a) is np.ndarray and a.shape == shape and a.dtype == _DTYPE.get(dtype, dtype) and a.flags.c_contiguous:
        return
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


_DTYPE: dict[type, np.dtype] = {t: np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64)}


def _check_rows(X: np.ndarray, y: np.ndarray | None) -> tuple[int, int]:
    """Return (n, d) after checking X float32 (n, d) and y float32 (n,) or None."""
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        shape = getattr(X, "shape", None)
        raise ValueError(f"X must be a 2-D numpy array (n, d), got shape {shape}")
    n, d = X.shape
    _check_array(X, "X", np.float32, (n, d))
    if y is not None:
        _check_array(y, "y", np.float32, (n,))
    return n, d


def _check_out(a: np.ndarray, name: str, shape: tuple[int, ...]) -> None:
    """Raise unless a is a writable C-contiguous float64 array of the given shape."""
    _check_array(a, name, np.float64, shape)
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writable")


def _check_k(k: int) -> int:
    """Return k as an int >= 1 or raise TypeError / ValueError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 classes, got {k}")
    return int(k)


def _check_labels(y: np.ndarray, k: int) -> None:
    """Raise ValueError unless all labels lie in [0, k): kernels index with them."""
    if y.size == 0:
        return
    lo = y.min()
    hi = y.max()
    # Written so that NaN fails too.
    if not (lo >= 0.0 and hi < k):
        raise ValueError(f"class labels must lie in 0..{k - 1}, got range {lo}..{hi}")


# --------------------------------------------------------------------------- public

GLM_COMPUTE = ("float64", "float32")


def _glm(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray, logistic: bool,
         compute: str) -> float:
    """Run the linear/logistic gradient, threaded when numba has more than one thread."""
    _, d = _check_rows(X, y)
    _check_array(w, "w", np.float64, (d + 1,))
    _check_out(g, "g_out", (d + 1,))
    if compute not in GLM_COMPUTE:
        raise ValueError(f"compute must be one of {', '.join(GLM_COMPUTE)}, got {compute!r}")
    threaded = num_threads() > 1 and X.shape[0] >= 2 * _CHUNK_MIN_ROWS
    return float((_glm_grad_threads if threaded else _glm_grad)(X, y, w, g, logistic, compute == "float32"))


def linear_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, g_out: np.ndarray, compute: str = "float64"
) -> float:
    """Fill g_out (d+1,) with the summed 0.5*(x.w+b-y)^2 gradient; return loss sum.

    ``compute="float32"``: products in float32 (kernels.cpu_glm), sums float64.
    """
    return _glm(X, y, w, g_out, False, compute)


def logistic_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, g_out: np.ndarray, compute: str = "float64"
) -> float:
    """Fill g_out (d+1,) with the summed log-loss gradient (0/1 y); return loss sum.

    ``compute="float32"``: products in float32 (kernels.cpu_glm), sums float64.
    """
    return _glm(X, y, w, g_out, True, compute)


def softmax_grad(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int, g_out: np.ndarray
) -> float:
    """Fill g_out ((d+1)*k,) with the summed cross-entropy gradient; return loss sum."""
    _, d = _check_rows(X, y)
    k = _check_k(k)
    _check_array(W_flat, "W_flat", np.float64, ((d + 1) * k,))
    _check_out(g_out, "g_out", ((d + 1) * k,))
    _check_labels(y, k)
    if num_threads() > 1 and X.shape[0] >= 2 * _CHUNK_MIN_ROWS:
        return float(_softmax_grad_threads(X, y, W_flat, k, g_out))
    return float(_softmax_grad(X, y, W_flat, k, g_out))


def linear_predict(X: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Fill out (n,) float64 with the predictions x.w + b."""
    n, d = _check_rows(X, None)
    _check_array(w, "w", np.float64, (d + 1,))
    _check_out(out, "out", (n,))
    _linear_predict(X, w, out)


def logistic_predict_proba(X: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """Fill out (n,) float64 with P(y = 1 | x) = sigmoid(x.w + b)."""
    n, d = _check_rows(X, None)
    _check_array(w, "w", np.float64, (d + 1,))
    _check_out(out, "out", (n,))
    _logistic_predict_proba(X, w, out)


def softmax_predict_proba(
    X: np.ndarray, W_flat: np.ndarray, k: int, out: np.ndarray
) -> None:
    """Fill out (n, k) float64 with softmax-regression class probabilities."""
    n, d = _check_rows(X, None)
    k = _check_k(k)
    _check_array(W_flat, "W_flat", np.float64, ((d + 1) * k,))
    _check_out(out, "out", (n, k))
    _softmax_predict_proba(X, W_flat, k, out)


def warmup() -> None:
    """Compile each kernel on tiny inputs or load it from numba's cache (~3 s/0.3 s)."""
    rng = np.random.default_rng(0)
    n, d, k = 3, 2, 3
    X = rng.standard_normal((n, d)).astype(np.float32)
    y01 = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    ycls = np.array([0.0, 2.0, 1.0], dtype=np.float32)
    w = rng.standard_normal(d + 1)
    W = rng.standard_normal((d + 1) * k)
    for logistic in (False, True):
        for f32 in (False, True):
            _glm_grad(X, y01, w, np.empty(d + 1), logistic, f32)
            _glm_grad_threads(X, y01, w, np.empty(d + 1), logistic, f32)
    _softmax_grad(X, ycls, W, k, np.empty((d + 1) * k))
    _softmax_grad_threads(X, ycls, W, k, np.empty((d + 1) * k))
    _softmax_xent_inplace(rng.standard_normal((n, k)), ycls)
    _squared_residual_inplace(rng.standard_normal((n, 1)), y01)
    _linear_predict(X, w, np.empty(n))
    _logistic_predict_proba(X, w, np.empty(n))
    _softmax_predict_proba(X, W, k, np.empty((n, k)))
    _first_label_outside(ycls, float(k))
