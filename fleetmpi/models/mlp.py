"""Multi-layer perceptron: 1-2 hidden ReLU layers, softmax output; BLAS through numpy."""

from __future__ import annotations

import numpy as np

from fleetmpi.models.base import Model
from kernels import cpu, exact, reference


class MLP(Model):
    kind, task = "mlp", "multiclass"

    def __init__(self, sizes: tuple[int, ...], l2: float) -> None:
        super().__init__(l2)
        self.sizes = tuple(int(s) for s in sizes)
        self.k = self.sizes[-1]

    @property
    def n_params(self) -> int:
        return reference.mlp_param_count(self.sizes)

    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        """He-initialise weights (``scale`` is unused: ReLU layers need fan-in scaling), zero biases."""
        p = np.zeros(self.n_params)
        for W, _b in reference.mlp_unpack(p, self.sizes):
            W[...] = rng.normal(0.0, np.sqrt(2.0 / W.shape[0]), W.shape)
        return p

    def weight_mask(self) -> np.ndarray:
        m = np.zeros(self.n_params)
        for W, _b in reference.mlp_unpack(m, self.sizes):
            W[...] = 1.0
        return m

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        self.check_labels(y, self.k)
        return float(cpu.mlp_grad(X, y, params, self.sizes, g_out))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        # Numba row loops instead of BLAS: a row's activations must not depend on its batch.
        self.check_labels(y, self.k)
        return exact.mlp_rows(X, y, params, self.sizes)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        return reference.mlp_predict_proba(X, params, self.sizes)

    def meta(self) -> dict:
        return {**super().meta(), "sizes": list(self.sizes), "d": self.sizes[0], "classes": self.k}
