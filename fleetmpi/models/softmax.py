"""Multiclass softmax regression, fused numba kernel (dense X or CSR rows, ``kernels.sparse``)."""

from __future__ import annotations

import numpy as np

from fleetmpi.models.base import Model
from kernels import cpu, exact, sparse


class SoftmaxRegression(Model):
    kind, task = "softmax", "multiclass"

    def __init__(self, d: int, k: int, l2: float) -> None:
        super().__init__(l2)
        self.d, self.k = d, k

    @property
    def n_params(self) -> int:
        return (self.d + 1) * self.k

    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        W = rng.normal(0.0, scale, (self.d + 1, self.k))
        W[self.d] = 0.0
        return W.ravel()

    def weight_mask(self) -> np.ndarray:
        m = np.ones((self.d + 1, self.k))
        m[self.d] = 0.0
        return m.ravel()

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        self.check_labels(y, self.k)
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_grad(X, y, params, self.k, g_out)
        return float(cpu.softmax_grad(X, y, params, self.k, g_out))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        self.check_labels(y, self.k)
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_rows(X, y, params, self.k)
        return exact.softmax_rows(X, y, params, self.k)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_predict_proba(X, params, self.k)
        out = np.empty((X.shape[0], self.k))
        cpu.softmax_predict_proba(X, params, self.k, out)
        return out

    def meta(self) -> dict:
        return {**super().meta(), "d": self.d, "classes": self.k}
