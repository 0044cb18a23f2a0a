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

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray,
                      zeroed: bool = False) -> float:
        # zeroed (CSR rows only): g_out is all zero already (fleetmpi.sync.base.CsrGrad cleared it)
        self.check_labels(y, self.k)
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_grad(X, y, params, self.k, g_out, zeroed)
        return float(cpu.softmax_grad(X, y, params, self.k, g_out))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        self.check_labels(y, self.k)
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_rows(X, y, params, self.k)
        return exact.softmax_rows(X, y, params, self.k)

    def eval_sums(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, float]:
        if isinstance(X, sparse.CsrBatch):
            # One forward pass (the base class's runs a gradient into a parameter-sized buffer
            # and a prediction); the same loss and predicted classes, bit for bit.
            self.check_labels(y, self.k)
            return sparse.softmax_eval(X, y, params, self.k)
        return super().eval_sums(X, y, params)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        if isinstance(X, sparse.CsrBatch):
            return sparse.softmax_predict_proba(X, params, self.k)
        out = np.empty((X.shape[0], self.k))
        cpu.softmax_predict_proba(X, params, self.k, out)
        return out

    def meta(self) -> dict:
        return {**super().meta(), "d": self.d, "classes": self.k}
