"""Multi-layer perceptron: 1-2 hidden ReLU layers; softmax output, or one identity output for regression.

``task: regression`` (automatic on ``data.windows``) ends in one linear unit trained on
0.5 (f(x) - y)^2, the squared error ``linear`` and ``ar`` minimise, so it is a nonlinear
forecaster on lag windows. BLAS through numpy (``kernels.cpu_mlp``), in float64 or, with
``dtype="float32"``, single-precision products (parameters and gradient sums stay float64).
"""

from __future__ import annotations

import numpy as np

from fleetmpi.models.base import Model
from kernels import cpu_mlp, exact, reference


class MLP(Model):
    kind = "mlp"

    def __init__(self, sizes: tuple[int, ...], l2: float, task: str = "multiclass",
                 dtype: str = "float64") -> None:
        super().__init__(l2)
        if task not in ("multiclass", "regression"):
            raise ValueError(f"mlp task must be multiclass or regression, got {task!r}")
        if dtype not in cpu_mlp.DTYPES:
            raise ValueError(f"mlp dtype must be one of {', '.join(cpu_mlp.DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.task = task
        self.sizes = tuple(int(s) for s in sizes)
        self.k = self.sizes[-1]
        if task == "regression" and self.k != 1:
            raise ValueError(f"a regression mlp has one output unit; sizes end in {self.k}")

    @property
    def regression(self) -> bool:
        return self.task == "regression"

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
        if self.regression:
            return float(cpu_mlp.mlp_regression_grad(X, y, params, self.sizes, g_out, self.dtype))
        self.check_labels(y, self.k)
        return float(cpu_mlp.mlp_grad(X, y, params, self.sizes, g_out, self.dtype))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        # Numba row loops instead of BLAS: a row's activations must not depend on its batch.
        if not self.regression:
            self.check_labels(y, self.k)
        return exact.mlp_rows(X, y, params, self.sizes, regression=self.regression)

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        if self.regression:
            return reference.mlp_regression_predict(X, params, self.sizes)
        return reference.mlp_predict_proba(X, params, self.sizes)

    def meta(self) -> dict:
        classes = None if self.regression else self.k
        return {**super().meta(), "sizes": list(self.sizes), "d": self.sizes[0], "classes": classes,
                "task": self.task}
