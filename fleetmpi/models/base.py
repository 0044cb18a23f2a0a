"""The contract every model family fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Model(ABC):
    """A model over a flat float64 parameter vector; gradients are sums over rows."""

    kind: str
    task: str  # regression | binary | multiclass

    def __init__(self, l2: float) -> None:
        self.l2 = l2

    @property
    @abstractmethod
    def n_params(self) -> int: ...

    @abstractmethod
    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """Return freshly initialised parameters (float64, length n_params)."""

    @abstractmethod
    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        """Fill g_out with the gradient summed over the rows; return the summed loss (no L2)."""

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """Return (summed loss, per-tensor row factors (U (n, d), V (n, k))) for exact sync.

        The gradient sum over the rows is, tensor after tensor in parameter order, the
        (d + 1, k) block sum_i [U_i, 1] (outer) V_i; each row's factors depend only on
        that row and ``params`` (see ``kernels.exact``).
        """
        raise NotImplementedError(f"model kind {self.kind!r} has no per-row factors; exact sync cannot use it")

    @abstractmethod
    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Return predictions: values (regression), P(y=1) (binary) or class probabilities (n, k)."""

    @abstractmethod
    def weight_mask(self) -> np.ndarray:
        """Return a float64 mask that is 1 on weights and 0 on biases (L2 skips biases)."""

    def meta(self) -> dict[str, Any]:
        """Return what is needed to rebuild this model from a saved file."""
        return {"kind": self.kind, "l2": self.l2}

    def check_labels(self, y: np.ndarray, k: int) -> None:
        """Refuse labels the kernels would index out of range (cheap: one pass over y)."""
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels must be class ids in 0..{k - 1}; batch holds [{y.min():g}, {y.max():g}]")

    def eval_sums(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, float]:
        """Return (summed loss, count of correct predictions) over the rows; regression counts 0."""
        g = np.empty_like(params)
        loss = self.loss_grad_sum(X, y, params, g)
        if self.task == "regression" or X.shape[0] == 0:
            return loss, 0.0
        p = self.predict(X, params)
        pred = (p >= 0.5).astype(np.float32) if p.ndim == 1 else p.argmax(axis=1).astype(np.float32)
        return loss, float((pred == y).sum())
