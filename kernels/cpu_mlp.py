"""ReLU MLP loss, gradient sums and predictions on one CPU thread: BLAS matrix products.

Same conventions as ``kernels.cpu`` (X float32 (n, d), flat float64 parameters and
gradient sums). ``dtype`` picks the arithmetic of the matrix products: float64 (the
default, agrees with ``kernels.reference`` to ~1e-12), or float32, which runs on
single-precision BLAS (about twice the FLOP rate, and X needs no float64 copy) and agrees
to ~1e-5 relative. Parameters stay float64 either way: the optimiser, the sync and the
checkpoints are unchanged, the weights are rounded to float32 for the products and the
gradient sums widened back. The loss and the softmax are computed in float64 in both.

Determinism: with one BLAS thread a product's summation order depends only on its shapes
and the BLAS kernel chosen for the CPU, so a rank's result is repeatable run to run; it
is not bitwise portable between CPU models (nor is the float64 path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kernels import reference
from kernels.cpu import _check_array, _check_labels, _check_out, _check_rows, _softmax_xent_inplace, _squared_residual_inplace

__all__ = ["DTYPES", "mlp_grad", "mlp_predict_proba", "mlp_regression_grad", "mlp_regression_predict"]

DTYPES = ("float64", "float32")
_BY_NAME = {name: np.dtype(name) for name in DTYPES}

_Layers = list[tuple[np.ndarray, np.ndarray]]


def _compute_dtype(dtype: str | type | np.dtype) -> np.dtype:
    """Return np.float64 or np.float32 for dtype, or raise ValueError naming the valid ones."""
    if type(dtype) is str and dtype in _BY_NAME:   # each step's case: no dtype.name (an import in numpy)
        return _BY_NAME[dtype]
    try:
        # np.dtype(None) would be float64: a missing dtype is an error, not the default.
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"MLP compute dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dt


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


def _layers(params: np.ndarray, s: tuple[int, ...], dt: np.dtype) -> _Layers:
    """Return the (W, b) layers as views (float64) or rounded copies (float32)."""
    layers = reference.mlp_unpack(params, s)
    if dt == np.float64:
        return layers
    return [(W.astype(dt), b.astype(dt)) for W, b in layers]


def _mlp_forward(X: np.ndarray, layers: _Layers) -> tuple[list[np.ndarray], np.ndarray]:
    """Return every layer's input (X, then ReLU activations) and the output pre-activations.

    Computed in the layers' dtype: float32 layers use X as it is, float64 layers a copy.
    """
    acts = [X.astype(layers[0][0].dtype, copy=False)]
    for W, b in layers[:-1]:
        h = acts[-1] @ W
        h += b
        np.maximum(h, 0.0, out=h)
        acts.append(h)
    W, b = layers[-1]
    Z = acts[-1] @ W
    Z += b
    return acts, Z


def _mlp_backward(acts: list[np.ndarray], dZ: np.ndarray, layers: _Layers, grads: _Layers) -> None:
    """Write the gradient sums into grads (float64 views of g_out) from the output delta dZ."""
    dt = layers[0][0].dtype
    dZ = dZ.astype(dt, copy=False)
    for i in range(len(layers) - 1, -1, -1):
        gW, gb = grads[i]
        if dt == np.float64:
            np.matmul(acts[i].T, dZ, out=gW)
        else:
            # A float64 out would make numpy run the product in float64.
            gW[...] = acts[i].T @ dZ
        # Bias sums in float64 from either dtype (n adds per unit: cheap).
        np.sum(dZ, axis=0, out=gb, dtype=np.float64)
        if i > 0:
            dA = dZ @ layers[i][0].T
            # ReLU passes gradient only where its output was positive.
            dA *= acts[i] > 0.0
            dZ = dA


def _grad(X: np.ndarray, y: np.ndarray, params: np.ndarray, s: tuple[int, ...], g_out: np.ndarray,
          dtype: str | type, loss_inplace: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """Forward, ``loss_inplace`` (turns the outputs into dLoss/dZ, returns the loss sum), backward into g_out."""
    layers = _layers(params, s, _compute_dtype(dtype))
    acts, Z = _mlp_forward(X, layers)
    dZ = Z.astype(np.float64, copy=False)
    loss = float(loss_inplace(dZ, y))
    _mlp_backward(acts, dZ, layers, reference.mlp_unpack(g_out, s))
    return loss


def mlp_grad(
    X: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    sizes: Sequence[int],
    g_out: np.ndarray,
    dtype: str | type = "float64",
) -> float:
    """Fill g_out with the summed ReLU-MLP cross-entropy gradient; return loss sum."""
    s = _mlp_check(X, y, params, sizes, g_out)
    _check_labels(y, s[-1])
    return _grad(X, y, params, s, g_out, dtype, _softmax_xent_inplace)


def mlp_regression_grad(
    X: np.ndarray,
    y: np.ndarray,
    params: np.ndarray,
    sizes: Sequence[int],
    g_out: np.ndarray,
    dtype: str | type = "float64",
) -> float:
    """Fill g_out with the summed 0.5*(f(x)-y)^2 gradient of a one-output ReLU MLP; return loss sum."""
    s = _mlp_check(X, y, params, sizes, g_out)
    if s[-1] != 1:
        raise ValueError(f"a regression MLP has one output unit: sizes must end in 1, got {s}")
    return _grad(X, y, params, s, g_out, dtype, _squared_residual_inplace)


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
