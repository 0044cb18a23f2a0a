"""The contract every model family fulfils, built-in or a user's own (``kind: custom``).

Parameters are one flat float64 vector of length ``n_params``. Every rank holds the same
parameters and calls the same methods on its own rows, so nothing here may depend on
the rank, the rank count or which other rows share a batch: the framework sums what
these methods return over the ranks (gradient and loss sums), divides by the global
batch and adds L2 itself (``l2 * weight_mask() * params``). ``X`` is float32 (n, d) and
``y`` float32 (n,), both C-contiguous; ``n`` may be 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from kernels import lazy_function

# kernels.cpu's (numba), imported at its first call: this module is imported without numba.
_labels_within = lazy_function("kernels.cpu", "labels_within")


class Model(ABC):
    """A model over a flat float64 parameter vector; gradients are sums over rows."""

    kind: str
    task: str  # regression | binary | multiclass: what y holds and what predict returns

    def __init__(self, l2: float) -> None:
        self.l2 = l2

    @property
    @abstractmethod
    def n_params(self) -> int:
        """Return the parameter count (the length of every params, gradient and mask vector)."""

    @abstractmethod
    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """Return fresh parameters, float64 (n_params,), drawn only from ``rng`` (N(0, scale) weights, typically).

        Every rank gets an ``rng`` with the same seed and must return the same vector.
        """

    @abstractmethod
    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        """Overwrite g_out (float64, (n_params,)) with the gradient summed over the n rows; return the summed loss.

        Sums, not means, and without L2: the framework adds the ranks' sums and divides by
        the global batch. Zero rows give a zero gradient and a loss of 0.0.
        """

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """Return (summed loss, per-tensor row factors [(U (n, d_t), V (n, k_t)), ...]) for ``sync: exact``.

        Optional (without it ``sync: exact`` refuses the model). Parameters read as
        consecutive (d_t + 1, k_t) tensors, weights then a bias row; their gradient sum is
        sum_i [U_i, 1] (outer) V_i, tensor after tensor, so sum_t (d_t + 1) k_t = n_params.
        Row i's factors may depend only on row i and ``params`` (fixed summation order, no
        BLAS), so every split of rows over ranks gives bitwise the same sum (``kernels.exact``).
        """
        raise NotImplementedError(f"model kind {self.kind!r} has no per-row factors; exact sync cannot use it")

    @abstractmethod
    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Return predictions for the n rows: values (n,) (regression), P(y=1) (n,) (binary) or probabilities (n, k)."""

    @abstractmethod
    def weight_mask(self) -> np.ndarray:
        """Return float64 (n_params,): 1 where L2 applies (weights), 0 where it does not (biases)."""

    def meta(self) -> dict[str, Any]:
        """Return JSON-able fields that rebuild this model from a saved file (kind, l2, shapes)."""
        return {"kind": self.kind, "l2": self.l2}

    def check_labels(self, y: np.ndarray, k: int) -> None:
        """Refuse labels outside class ids 0..k-1, which kernels would index out of range (one pass over y).

        A training batch (float32, 1-D) is checked by one numba pass (NaN refused too); other arrays by numpy.
        """
        if not y.size:
            return
        if isinstance(y, np.ndarray) and y.dtype == np.float32 and y.ndim == 1:
            if _labels_within(y, k):
                return
        elif not (y.min() < 0 or y.max() >= k):
            return
        raise ValueError(f"labels must be class ids in 0..{k - 1}; batch holds [{np.min(y):g}, {np.max(y):g}]")

    def eval_sums(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, float]:
        """Return (summed loss, count of correct predictions) over the rows; regression counts 0."""
        g = np.empty_like(params)
        loss = self.loss_grad_sum(X, y, params, g)
        if self.task == "regression" or X.shape[0] == 0:
            return loss, 0.0
        p = self.predict(X, params)
        pred = (p >= 0.5).astype(np.float32) if p.ndim == 1 else p.argmax(axis=1).astype(np.float32)
        return loss, float((pred == y).sum())
