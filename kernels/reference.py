"""Compute loss and gradient sums and predictions in plain numpy: the kernels' oracle.

Conventions shared by every kernel in this package:

* ``X`` has shape ``(n, d)``; ``y`` has shape ``(n,)``. For ``logistic`` ``y`` is 0/1,
  for ``softmax`` and ``mlp`` it holds class labels ``0..k-1`` stored as floats, for
  ``linear`` it is the real target.
* Parameters are one flat float64 vector. linear / logistic: ``w[:d]`` weights,
  ``w[d]`` bias. softmax: ``(d+1)*k`` values, row-major ``(d+1, k)``, last row bias.
  mlp: per layer the ``(in, out)`` weight matrix row-major, then the ``out`` bias.
* Gradient functions return the SUM over rows of the loss and of the gradient, with no
  regularisation. Everything is computed in float64.

These functions favour clarity over speed; ``kernels.cpu`` must agree with them.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import numpy as np

__all__ = [
    "csr_dense",
    "csr_linear_loss_grad",
    "csr_logistic_loss_grad",
    "csr_softmax_loss_grad",
    "linear_loss_grad",
    "linear_predict",
    "logistic_loss_grad",
    "logistic_loss_grad_twopass",
    "logistic_predict_proba",
    "mlp_loss_grad",
    "mlp_param_count",
    "mlp_predict_proba",
    "mlp_regression_loss_grad",
    "mlp_regression_predict",
    "mlp_unpack",
    "softmax_loss_grad",
    "softmax_predict_proba",
]


def _features(X: np.ndarray) -> np.ndarray:
    """Return X as a float64 (n, d) array, raising ValueError on any other shape."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D with shape (n, d), got shape {X.shape}")
    return X.astype(np.float64, copy=False)


def _targets(y: np.ndarray, n: int) -> np.ndarray:
    """Return y as a float64 (n,) array, raising ValueError on any other shape."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) to match X, got shape {y.shape}")
    return y.astype(np.float64, copy=False)


def _params(w: np.ndarray, size: int, name: str) -> np.ndarray:
    """Return a flat float64 parameter vector of length size or raise ValueError."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got shape {w.shape}")
    return w


def _classes(k: int) -> int:
    """Return the class count k as an int >= 1 or raise TypeError / ValueError."""
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1 classes, got {k}")
    return k


def _labels(y: np.ndarray, k: int) -> np.ndarray:
    """Return int labels from float ones; raise ValueError unless all lie in 0..k-1."""
    if y.size and not (np.all(np.isfinite(y)) and np.all(y == np.floor(y))):
        raise ValueError("y must hold integer class labels stored as floats")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"class labels must lie in 0..{k - 1}, got range "
            f"{labels.min()}..{labels.max()}"
        )
    return labels


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Return 1 / (1 + exp(-z)) without overflow for any finite z."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _log_loss(z: np.ndarray, y: np.ndarray) -> float:
    """Return the summed log-loss of logits z against 0/1 targets y, stable in z."""
    return float(np.sum(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0) - y * z))


def _softmax_xent(Z: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Return summed cross-entropy of logits Z (n, k) and dZ = softmax(Z) - onehot."""
    m = Z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(Z - m).sum(axis=1))
    rows = np.arange(Z.shape[0])
    loss = float(np.sum(lse - Z[rows, labels]))
    dZ = np.exp(Z - lse[:, None])
    dZ[rows, labels] -= 1.0
    return loss, dZ


def _softmax(Z: np.ndarray) -> np.ndarray:
    """Return row-wise softmax probabilities of logits Z (n, k)."""
    m = Z.max(axis=1, keepdims=True)
    e = np.exp(Z - m)
    return e / e.sum(axis=1, keepdims=True)


def linear_loss_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Return the summed squared-error loss 0.5*(x.w+b-y)^2 and its gradient (d+1,)."""
    X = _features(X)
    n, d = X.shape
    y = _targets(y, n)
    w = _params(w, d + 1, "w")
    r = X @ w[:d] + w[d] - y
    g = np.empty(d + 1)
    g[:d] = X.T @ r
    g[d] = r.sum()
    return 0.5 * float(r @ r), g


def linear_predict(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Return the float64 predictions x.w + b, shape (n,)."""
    X = _features(X)
    d = X.shape[1]
    w = _params(w, d + 1, "w")
    return X @ w[:d] + w[d]


def logistic_loss_grad(
    X: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Return summed log-loss of sigmoid(x.w + b) vs 0/1 y and its gradient (d+1,)."""
    X = _features(X)
    n, d = X.shape
    y = _targets(y, n)
    w = _params(w, d + 1, "w")
    z = X @ w[:d] + w[d]
    r = _sigmoid(z) - y
    g = np.empty(d + 1)
    g[:d] = X.T @ r
    g[d] = r.sum()
    return _log_loss(z, y), g


def logistic_loss_grad_twopass(
    X: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Return logistic loss and gradient sums as a numpy user writes them (a baseline).

    Two passes over X (``X @ w`` then ``X.T @ r``); numpy promotes a float32 X to
    float64 for each product because w is float64.
    """
    d = X.shape[1]
    z = X @ w[:d] + w[d]
    r = _sigmoid(z) - y
    g = np.empty(d + 1)
    g[:d] = X.T @ r
    g[d] = r.sum()
    return _log_loss(z, y), g


def logistic_predict_proba(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Return P(y = 1 | x) = sigmoid(x.w + b), float64 shape (n,)."""
    X = _features(X)
    d = X.shape[1]
    w = _params(w, d + 1, "w")
    return _sigmoid(X @ w[:d] + w[d])


def softmax_loss_grad(
    X: np.ndarray, y: np.ndarray, W_flat: np.ndarray, k: int
) -> tuple[float, np.ndarray]:
    """Return summed cross-entropy of softmax regression and its gradient ((d+1)*k,)."""
    X = _features(X)
    n, d = X.shape
    k = _classes(k)
    labels = _labels(_targets(y, n), k)
    W = _params(W_flat, (d + 1) * k, "W_flat").reshape(d + 1, k)
    loss, dZ = _softmax_xent(X @ W[:d] + W[d], labels)
    G = np.empty((d + 1, k))
    G[:d] = X.T @ dZ
    G[d] = dZ.sum(axis=0)
    return loss, G.ravel()


def softmax_predict_proba(X: np.ndarray, W_flat: np.ndarray, k: int) -> np.ndarray:
    """Return class probabilities of softmax regression, float64 shape (n, k)."""
    X = _features(X)
    d = X.shape[1]
    k = _classes(k)
    W = _params(W_flat, (d + 1) * k, "W_flat").reshape(d + 1, k)
    return _softmax(X @ W[:d] + W[d])


def _mlp_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Return layer widths as a tuple of ints >= 1, at least input and output."""
    try:
        out = tuple(operator.index(s) for s in sizes)
    except TypeError:
        raise TypeError(
            f"sizes must be a sequence of ints such as (d, h1, k), got {sizes!r}"
        ) from None
    if len(out) < 2 or min(out) < 1:
        raise ValueError(
            f"sizes must be >= 2 positive layer widths such as (d, h1, k), got {out}"
        )
    return out


def mlp_param_count(sizes: Sequence[int]) -> int:
    """Return the parameter count of an MLP with layer widths sizes = (d, ..., k)."""
    s = _mlp_sizes(sizes)
    return sum(a * b + b for a, b in itertools.pairwise(s))


def mlp_unpack(
    params: np.ndarray, sizes: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return per-layer (W (in, out), b (out,)) views into flat params, not copies."""
    s = _mlp_sizes(sizes)
    if not isinstance(params, np.ndarray):
        raise TypeError(f"params must be a numpy array, got {type(params).__name__}")
    count = mlp_param_count(s)
    if params.shape != (count,):
        raise ValueError(
            f"params must have shape ({count},) for sizes {s}, got {params.shape}"
        )
    if not params.flags.c_contiguous:
        raise ValueError(
            "params must be contiguous so that layers are views, not copies"
        )
    layers = []
    off = 0
    for a, b in itertools.pairwise(s):
        W = params[off : off + a * b].reshape(a, b)
        off += a * b
        layers.append((W, params[off : off + b]))
        off += b
    return layers


def _mlp_check(
    X: np.ndarray, params: np.ndarray, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Return float64 X, float64 params and sizes after checking they fit together."""
    X = _features(X)
    s = _mlp_sizes(sizes)
    if X.shape[1] != s[0]:
        raise ValueError(f"X has {X.shape[1]} columns but sizes[0] is {s[0]}")
    params = np.ascontiguousarray(params, dtype=np.float64)
    return X, params, s


def _mlp_forward(
    X: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Return every layer's input (X, then ReLU activations) and the output logits."""
    acts = [X]
    for W, b in layers[:-1]:
        acts.append(np.maximum(acts[-1] @ W + b, 0.0))
    W, b = layers[-1]
    return acts, acts[-1] @ W + b


def mlp_loss_grad(
    X: np.ndarray, y: np.ndarray, params: np.ndarray, sizes: Sequence[int]
) -> tuple[float, np.ndarray]:
    """Return summed cross-entropy of a ReLU MLP (softmax output) and its gradient."""
    X, params, s = _mlp_check(X, params, sizes)
    labels = _labels(_targets(y, X.shape[0]), s[-1])
    layers = mlp_unpack(params, s)
    acts, Z = _mlp_forward(X, layers)
    loss, dZ = _softmax_xent(Z, labels)
    return loss, _mlp_backward(acts, dZ, layers, params, s)


def _mlp_backward(acts: list[np.ndarray], dZ: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]],
                  params: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
    """Return the flat gradient sum from the output delta dZ (n, k) and every layer's input."""
    g = np.empty_like(params)
    grads = mlp_unpack(g, s)
    for i in range(len(layers) - 1, -1, -1):
        gW, gb = grads[i]
        gW[...] = acts[i].T @ dZ
        gb[...] = dZ.sum(axis=0)
        if i > 0:
            # ReLU passes gradient only where its output was positive.
            dZ = (dZ @ layers[i][0].T) * (acts[i] > 0.0)
    return g


def _mlp_regression_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Return sizes after checking the regression MLP has one output unit."""
    s = _mlp_sizes(sizes)
    if s[-1] != 1:
        raise ValueError(f"a regression MLP has one output unit: sizes must end in 1, got {s}")
    return s


def mlp_regression_loss_grad(
    X: np.ndarray, y: np.ndarray, params: np.ndarray, sizes: Sequence[int]
) -> tuple[float, np.ndarray]:
    """Return summed 0.5*(f(x)-y)^2 of a ReLU MLP with one identity output, and its gradient."""
    X, params, s = _mlp_check(X, params, _mlp_regression_sizes(sizes))
    t = _targets(y, X.shape[0])
    layers = mlp_unpack(params, s)
    acts, Z = _mlp_forward(X, layers)
    dZ = Z - t[:, None]
    return 0.5 * float(np.sum(dZ * dZ)), _mlp_backward(acts, dZ, layers, params, s)


def mlp_regression_predict(
    X: np.ndarray, params: np.ndarray, sizes: Sequence[int]
) -> np.ndarray:
    """Return the predictions f(x) of a ReLU MLP with one identity output, float64 (n,)."""
    X, params, s = _mlp_check(X, params, _mlp_regression_sizes(sizes))
    _, Z = _mlp_forward(X, mlp_unpack(params, s))
    return Z[:, 0]


def mlp_predict_proba(
    X: np.ndarray, params: np.ndarray, sizes: Sequence[int]
) -> np.ndarray:
    """Return class probabilities of a ReLU MLP with softmax output, float64 (n, k)."""
    X, params, s = _mlp_check(X, params, sizes)
    _, Z = _mlp_forward(X, mlp_unpack(params, s))
    return _softmax(Z)


# --------------------------------------------------------------------------- CSR rows


def csr_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, d: int) -> np.ndarray:
    """Return CSR rows (indptr, indices, data) as a dense float64 (n, d) array."""
    indptr = np.asarray(indptr, np.int64)
    n = indptr.size - 1
    if n < 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
        raise ValueError("indptr must start at 0, never decrease and end at len(indices)")
    X = np.zeros((n, d))
    rows = np.repeat(np.arange(n), np.diff(indptr))
    np.add.at(X, (rows, np.asarray(indices, np.int64)), np.asarray(data, np.float64))
    return X


def csr_linear_loss_grad(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, d: int,
                         y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Return the squared-error loss and gradient sums (d+1,) over CSR rows."""
    return linear_loss_grad(csr_dense(indptr, indices, data, d), y, w)


def csr_logistic_loss_grad(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, d: int,
                           y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Return the log-loss and gradient sums (d+1,) over CSR rows."""
    return logistic_loss_grad(csr_dense(indptr, indices, data, d), y, w)


def csr_softmax_loss_grad(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, d: int,
                          y: np.ndarray, W_flat: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Return the cross-entropy and gradient sums ((d+1)*k,) over CSR rows."""
    return softmax_loss_grad(csr_dense(indptr, indices, data, d), y, W_flat, k)
