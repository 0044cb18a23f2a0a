"""Compute loss and gradient sums and predictions on one CPU thread with numba.

Same conventions as ``kernels.reference`` (X float32 C-contiguous (n, d), y float32
(n,), flat float64 parameters, gradient *sums*). linear, logistic and softmax are fused
single passes: each row's logit, residual and gradient contribution are computed while
the row is in L1. Numba compiles on first call (or loads its on-disk cache); call
``warmup()`` before timing-sensitive work.

The public functions check shapes and dtypes in O(1) (plus one O(n) label range check
for class labels, which keeps the kernels from indexing out of bounds) and call the
raw ``_*`` kernels, which do no checking at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit

from kernels import reference

__all__ = [
    "linear_grad",
    "linear_predict",
    "logistic_grad",
    "logistic_predict_proba",
    "mlp_grad",
    "mlp_predict_proba",
    "mlp_regression_grad",
    "mlp_regression_predict",
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
def _linear_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray) -> float:
    """Fill g (d+1,) with the summed squared-error gradient and return the loss sum."""
    n, d = X.shape
    g[:] = 0.0
    b = w[d]
    loss = 0.0
    gb = 0.0
    for i in range(n):
        x = X[i]
        r = _dot(x, w, d) + b - y[i]
        loss += 0.5 * r * r
        gb += r
        for j in range(d):
            g[j] += r * x[j]
    g[d] = gb
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def _logistic_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, g: np.ndarray) -> float:
    """Fill g (d+1,) with the summed log-loss gradient and return the loss sum."""
    n, d = X.shape
    g[:] = 0.0
    b = w[d]
    loss = 0.0
    gb = 0.0
    for i in range(n):
        x = X[i]
        z = _dot(x, w, d) + b
        yi = np.float64(y[i])
        # One exp serves both the stable loss and the stable sigmoid.
        e = math.exp(-abs(z))
        loss += math.log1p(e) + max(z, 0.0) - yi * z
        q = 1.0 / (1.0 + e)
        # A select, not a branch: the sign of z is unpredictable row to row.
        p = q if z >= 0.0 else e * q
        r = p - yi
        gb += r
        for j in range(d):
            g[j] += r * x[j]
    g[d] = gb
    return loss


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


@njit(cache=True, fastmath={"reassoc"}, nogil=True)
def _dot4(a0: np.ndarray, a1: np.ndarray, a2: np.ndarray, a3: np.ndarray, w: np.ndarray,
          d: int, out: np.ndarray) -> None:
    """Set out[:4] to the dot products of four rows with w (one pass over w)."""
    s0 = s1 = s2 = s3 = 0.0
    for j in range(d):
        wj = w[j]
        s0 += a0[j] * wj
        s1 += a1[j] * wj
        s2 += a2[j] * wj
        s3 += a3[j] * wj
    out[0], out[1], out[2], out[3] = s0, s1, s2, s3


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_grad(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int, g: np.ndarray
) -> float:
    """Fill g ((d+1)*k,) with the summed softmax cross-entropy gradient; return loss."""
    n, d = X.shape
    W = W_flat.reshape((d + 1, k))
    G = g.reshape((d + 1, k))
    # Class-major copies: each class's weights and gradient row are contiguous over d, so
    # both passes are vectorised loops over d (with W's (d+1, k) layout the inner loop
    # would run over k, ~10, too short to vectorise). Four rows share each pass over a
    # class's weights and gradient row.
    WT = np.ascontiguousarray(W[:d].T)
    GT = np.zeros((k, d))
    gb = np.zeros(k)
    R = np.empty((4, d))
    Z = np.empty((4, k))
    dots = np.empty(4)
    loss = 0.0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        for r in range(4):
            x = X[i + r]
            for j in range(d):
                R[r, j] = x[j]
        for c in range(k):
            _dot4(R[0], R[1], R[2], R[3], WT[c], d, dots)
            for r in range(4):
                Z[r, c] = dots[r] + W[d, c]
        for r in range(4):
            loss += _softmax_residual(Z[r], int(y[i + r]))
        for c in range(k):
            q0, q1, q2, q3 = Z[0, c], Z[1, c], Z[2, c], Z[3, c]
            gc = GT[c]
            for j in range(d):
                gc[j] += (q0 * R[0, j] + q1 * R[1, j]) + (q2 * R[2, j] + q3 * R[3, j])
            gb[c] += (q0 + q1) + (q2 + q3)
    z = Z[0]
    xr = R[0]
    for i in range(n4, n):
        x = X[i]
        for j in range(d):
            xr[j] = x[j]
        for c in range(k):
            z[c] = _dot(xr, WT[c], d) + W[d, c]
        loss += _softmax_residual(z, int(y[i]))
        for c in range(k):
            q = z[c]
            gc = GT[c]
            for j in range(d):
                gc[j] += q * xr[j]
            gb[c] += q
    for j in range(d):
        for c in range(k):
            G[j, c] = GT[c, j]
    for c in range(k):
        G[d, c] = gb[c]
    return loss


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


@njit(cache=True, fastmath=False, nogil=True)
def _softmax_predict_proba(
    X: np.ndarray, W_flat: np.ndarray, k: int, out: np.ndarray
) -> None:
    """Fill out (n, k) with the softmax-regression class probabilities."""
    n, d = X.shape
    W = W_flat.reshape((d + 1, k))
    for i in range(n):
        z = out[i]
        for c in range(k):
            z[c] = W[d, c]
        for j in range(d):
            xj = np.float64(X[i, j])
            for c in range(k):
                z[c] += xj * W[j, c]
        m = z[0]
        for c in range(1, k):
            m = max(m, z[c])
        s = 0.0
        for c in range(k):
            z[c] = math.exp(z[c] - m)
            s += z[c]
        inv = 1.0 / s
        for c in range(k):
            z[c] *= inv


# --------------------------------------------------------------------------- checks


def _check_array(a: np.ndarray, name: str, dtype: type, shape: tuple[int, ...]) -> None:
    """Raise TypeError / ValueError unless a is C-contiguous of dtype and shape."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")


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


def linear_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, g_out: np.ndarray
) -> float:
    """Fill g_out (d+1,) with the summed 0.5*(x.w+b-y)^2 gradient; return loss sum."""
    _, d = _check_rows(X, y)
    _check_array(w, "w", np.float64, (d + 1,))
    _check_out(g_out, "g_out", (d + 1,))
    return float(_linear_grad(X, y, w, g_out))


def logistic_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, g_out: np.ndarray
) -> float:
    """Fill g_out (d+1,) with the summed log-loss gradient (0/1 y); return loss sum."""
    _, d = _check_rows(X, y)
    _check_array(w, "w", np.float64, (d + 1,))
    _check_out(g_out, "g_out", (d + 1,))
    return float(_logistic_grad(X, y, w, g_out))


def softmax_grad(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int, g_out: np.ndarray
) -> float:
    """Fill g_out ((d+1)*k,) with the summed cross-entropy gradient; return loss sum."""
    _, d = _check_rows(X, y)
    k = _check_k(k)
    _check_array(W_flat, "W_flat", np.float64, ((d + 1) * k,))
    _check_out(g_out, "g_out", ((d + 1) * k,))
    _check_labels(y, k)
    return float(_softmax_grad(X, y, W_flat, k, g_out))


def _mlp_check(X: np.ndarray, y: np.ndarray | None, params: np.ndarray, sizes: Sequence[int],
               g_out: np.ndarray | None) -> tuple[int, ...]:
    """Return sizes as ints after checking X, y, params and g_out fit them (O(1))."""
    _check_rows(X, y)
    s = tuple(int(v) for v in sizes)
    count = reference.mlp_param_count(s)
    if s[0] != X.shape[1]:
        raise ValueError(f"X has {X.shape[1]} columns but sizes[0] is {s[0]}")
    _check_array(params, "params", np.float64, (count,))
    if g_out is not None:
        _check_out(g_out, "g_out", (count,))
    return s


def _mlp_forward(X: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Return every layer's input (float64 X, then ReLU activations) and the output pre-activations."""
    # BLAS does the matrix products in float64; numba only fuses the output loss.
    acts = [X.astype(np.float64)]
    for W, b in layers[:-1]:
        h = acts[-1] @ W
        h += b
        np.maximum(h, 0.0, out=h)
        acts.append(h)
    W, b = layers[-1]
    Z = acts[-1] @ W
    Z += b
    return acts, Z


def _mlp_backward(acts: list[np.ndarray], dZ: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]],
                  grads: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the gradient sums into grads (views of g_out) from the output delta dZ."""
    for i in range(len(layers) - 1, -1, -1):
        gW, gb = grads[i]
        np.matmul(acts[i].T, dZ, out=gW)
        np.sum(dZ, axis=0, out=gb)
        if i > 0:
            dA = dZ @ layers[i][0].T
            # ReLU passes gradient only where its output was positive.
            dA *= acts[i] > 0.0
            dZ = dA


def mlp_grad(
    X: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    sizes: Sequence[int],
    g_out: np.ndarray,
) -> float:
    """Fill g_out with the summed ReLU-MLP cross-entropy gradient; return loss sum."""
    s = _mlp_check(X, y, params, sizes, g_out)
    _check_labels(y, s[-1])
    layers = reference.mlp_unpack(params, s)
    acts, dZ = _mlp_forward(X, layers)
    loss = float(_softmax_xent_inplace(dZ, y))
    _mlp_backward(acts, dZ, layers, reference.mlp_unpack(g_out, s))
    return loss


def mlp_regression_grad(
    X: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    sizes: Sequence[int],
    g_out: np.ndarray,
) -> float:
    """Fill g_out with the summed 0.5*(f(x)-y)^2 gradient of a one-output ReLU MLP; return loss sum."""
    s = _mlp_check(X, y, params, sizes, g_out)
    if s[-1] != 1:
        raise ValueError(f"a regression MLP has one output unit: sizes must end in 1, got {s}")
    layers = reference.mlp_unpack(params, s)
    acts, dZ = _mlp_forward(X, layers)
    loss = float(_squared_residual_inplace(dZ, y))
    _mlp_backward(acts, dZ, layers, reference.mlp_unpack(g_out, s))
    return loss


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


def mlp_predict_proba(
    X: np.ndarray, params: np.ndarray, sizes: Sequence[int], out: np.ndarray
) -> None:
    """Fill out (n, k) float64 with the class probabilities of a ReLU MLP."""
    n, _ = _check_rows(X, None)
    count = reference.mlp_param_count(sizes)
    s = tuple(int(v) for v in sizes)
    _check_array(params, "params", np.float64, (count,))
    _check_out(out, "out", (n, s[-1]))
    out[...] = reference.mlp_predict_proba(X, params, s)


def mlp_regression_predict(
    X: np.ndarray, params: np.ndarray, sizes: Sequence[int], out: np.ndarray
) -> None:
    """Fill out (n,) float64 with the predictions of a one-output ReLU MLP."""
    n, _ = _check_rows(X, None)
    s = _mlp_check(X, None, params, sizes, None)
    if s[-1] != 1:
        raise ValueError(f"a regression MLP has one output unit: sizes must end in 1, got {s}")
    _check_out(out, "out", (n,))
    _, Z = _mlp_forward(X, reference.mlp_unpack(params, s))
    out[...] = Z[:, 0]


def warmup() -> None:
    """Compile each kernel on tiny inputs or load it from numba's cache (~3 s/0.3 s)."""
    rng = np.random.default_rng(0)
    n, d, k = 3, 2, 3
    X = rng.standard_normal((n, d)).astype(np.float32)
    y01 = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    ycls = np.array([0.0, 2.0, 1.0], dtype=np.float32)
    w = rng.standard_normal(d + 1)
    W = rng.standard_normal((d + 1) * k)
    _linear_grad(X, y01, w, np.empty(d + 1))
    _logistic_grad(X, y01, w, np.empty(d + 1))
    _softmax_grad(X, ycls, W, k, np.empty((d + 1) * k))
    _softmax_xent_inplace(rng.standard_normal((n, k)), ycls)
    _squared_residual_inplace(rng.standard_normal((n, 1)), y01)
    _linear_predict(X, w, np.empty(n))
    _logistic_predict_proba(X, w, np.empty(n))
    _softmax_predict_proba(X, W, k, np.empty((n, k)))
