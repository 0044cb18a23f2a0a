"""Linear autoregression AR(p) on lag windows, trained by gradient or solved in closed form.

A row is a lag window [y_{t-1}, ..., y_{t-p}] of one series (``fleetmpi.engine.windows``)
and its target y_t; the parameters are LinearRegression's: p lag weights, then the
intercept (held at 0 with ``trend: none``). Every column of a series file is one series
sharing the coefficients (a pooled AR); no column is used as an exogenous input of another.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleetmpi.models.linear import LinearRegression
from kernels import exact


class AutoRegression(LinearRegression):
    """AR(p) with an optional intercept; a sufficient-statistics provider for ``closed_form``."""

    kind, task = "ar", "regression"

    def __init__(self, lags: int, trend: str, l2: float) -> None:
        super().__init__(lags, l2)
        self.lags, self.trend = lags, trend

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray,
                      zeroed: bool = False) -> float:
        loss = super().loss_grad_sum(X, y, params, g_out, zeroed)
        if self.trend == "none":
            g_out[self.d] = 0.0    # no intercept: its parameter stays at the 0 init
        return loss

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, exact.Factors]:
        if self.trend == "none":   # factors always carry a bias row, which would move the intercept
            raise NotImplementedError("model kind ar with trend none has no per-row factors; use sync dense")
        return super().row_factors(X, y, params)

    # -- the closed_form technique's provider (fleetmpi.engine.closed_form.StatsProvider) ----
    @property
    def n_features(self) -> int:
        """Return the columns of ``features``: the lags, plus one for the intercept."""
        return self.d + (self.trend == "const")

    def features(self, X: np.ndarray) -> np.ndarray:
        """Return float64 (n, n_features): the lag window, then a 1 for the intercept."""
        Phi = np.empty((X.shape[0], self.n_features))
        Phi[:, :self.d] = X
        if self.trend == "const":
            Phi[:, self.d] = 1.0
        return Phi

    def solve(self, gram: np.ndarray, rhs: np.ndarray, n: int) -> np.ndarray:
        """Return params minimising mean 0.5 (phi.w - y)^2 + 0.5 l2 |lag weights|^2 over ``n`` rows.

        ``gram`` is sum phi phi^T, ``rhs`` sum phi y; the normal equations
        (gram + n l2 mask) w = rhs are solved by Cholesky (the same objective the gradient
        techniques minimise, so the fits agree).
        """
        A = gram.copy()
        k = self.n_features
        A[np.arange(self.d), np.arange(self.d)] += n * self.l2   # the intercept is not penalised
        try:
            L = np.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            raise ValueError(f"the lag windows' normal equations are singular ({k} unknowns from {n} windows); "
                             "a constant series or too few windows: raise model.l2 or add data") from None
        w = np.linalg.solve(L.T, np.linalg.solve(L, rhs))
        params = np.zeros(self.d + 1)
        params[:k] = w
        return params

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "lags": self.lags, "trend": self.trend}
