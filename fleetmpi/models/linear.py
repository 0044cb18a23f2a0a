"""Linear regression (squared loss) and binary logistic regression, fused numba kernels.

X is a dense float32 array or CSR rows (``kernels.sparse.CsrBatch``): then the kernels
cost ~ nnz and the gradient is nonzero only at the rows' columns and the bias.
``compute="float32"`` (spec ``model.compute``) runs the dense kernels' products, and the
logistic's sigmoid and row losses, in float32 (``kernels.cpu_glm``; parameters and the
sums of loss and gradient stay float64); CSR rows and predictions compute in float64
either way.
"""

from __future__ import annotations

import numpy as np

from fleetmpi.models.base import Model
from kernels import cpu, exact, sparse


class _Linear(Model):
    def __init__(self, d: int, l2: float, compute: str = "float64") -> None:
        super().__init__(l2)
        if compute not in cpu.GLM_COMPUTE:
            raise ValueError(f"{self.kind} compute must be one of {', '.join(cpu.GLM_COMPUTE)}, got {compute!r}")
        self.d = d
        self.compute = compute

    @property
    def n_params(self) -> int:
        return self.d + 1

    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        w = rng.normal(0.0, scale, self.d + 1)
        w[self.d] = 0.0
        return w

    def weight_mask(self) -> np.ndarray:
        m = np.ones(self.d + 1)
        m[self.d] = 0.0
        return m

    def meta(self) -> dict:
        return {**super().meta(), "d": self.d}


class LinearRegression(_Linear):
    kind, task = "linear", "regression"

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray,
                      zeroed: bool = False) -> float:
        # zeroed (CSR rows only): g_out is all zero already (fleetmpi.sync.base.CsrGrad cleared it)
        if isinstance(X, sparse.CsrBatch):
            return sparse.linear_grad(X, y, params, g_out, zeroed)
        return float(cpu.linear_grad(X, y, params, g_out, self.compute))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        if isinstance(X, sparse.CsrBatch):
            return sparse.linear_rows(X, y, params)
        return exact.linear_rows(X, y, params)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        if isinstance(X, sparse.CsrBatch):
            return sparse.linear_predict(X, params)
        out = np.empty(X.shape[0])
        cpu.linear_predict(X, params, out)
        return out


class LogisticRegression(_Linear):
    kind, task = "logistic", "binary"

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray,
                      zeroed: bool = False) -> float:
        self.check_labels(y, 2)
        if isinstance(X, sparse.CsrBatch):
            return sparse.logistic_grad(X, y, params, g_out, zeroed)
        return float(cpu.logistic_grad(X, y, params, g_out, self.compute))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        self.check_labels(y, 2)
        if isinstance(X, sparse.CsrBatch):
            return sparse.logistic_rows(X, y, params)
        return exact.logistic_rows(X, y, params)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        if isinstance(X, sparse.CsrBatch):
            return sparse.logistic_predict_proba(X, params)
        out = np.empty(X.shape[0])
        cpu.logistic_predict_proba(X, params, out)
        return out
