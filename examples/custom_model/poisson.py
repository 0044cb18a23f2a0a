"""Poisson regression with a log link: a user's own model for fleetmpi (``kind: custom``).

Counts y >= 0 with rate mu = exp(x.w + b). The per-row loss is the negative
log-likelihood mu - y (x.w + b), plus log(y!) with ``full_nll: true`` (a constant that
changes the reported loss, not the gradient). Each kernel is one numba pass over the
rows, with a fixed summation order, so a row's result never depends on its batch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fleetmpi.models.base import Model


@njit(cache=True, fastmath=False, nogil=True)
def _eta(x: np.ndarray, w: np.ndarray, d: int) -> float:
    """Return x.w + b for one row, summed left to right."""
    s = w[d]
    for j in range(d):
        s += x[j] * w[j]
    return s


@njit(cache=True, fastmath=False, nogil=True)
def poisson_loss_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, full_nll: bool, g: np.ndarray) -> float:
    """Overwrite g (d + 1,) with the gradient summed over rows; return the summed loss (nats)."""
    n, d = X.shape
    g[:] = 0.0
    loss = 0.0
    for i in range(n):
        eta = _eta(X[i], w, d)
        mu = math.exp(eta)
        loss += mu - y[i] * eta
        if full_nll:
            loss += math.lgamma(y[i] + 1.0)
        r = mu - y[i]
        for j in range(d):
            g[j] += r * X[i, j]
        g[d] += r
    return loss


@njit(cache=True, fastmath=False, nogil=True)
def poisson_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray, full_nll: bool, R: np.ndarray) -> float:
    """Fill R (n, 1) with each row's mu - y; return the summed loss (nats)."""
    n, d = X.shape
    loss = 0.0
    for i in range(n):
        eta = _eta(X[i], w, d)
        mu = math.exp(eta)
        loss += mu - y[i] * eta
        if full_nll:
            loss += math.lgamma(y[i] + 1.0)
        R[i, 0] = mu - y[i]
    return loss


class PoissonRegression(Model):
    """Poisson regression: parameters are d weights then one bias."""

    kind, task = "poisson", "regression"

    def __init__(self, d: int, l2: float, full_nll: bool = False) -> None:
        super().__init__(l2)
        self.d, self.full_nll = d, bool(full_nll)

    @property
    def n_params(self) -> int:
        return self.d + 1

    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        w = rng.normal(0.0, scale, self.d + 1)
        w[self.d] = 0.0
        return w

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        return float(poisson_loss_grad(X, y, params, self.full_nll, g_out))

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        R = np.empty((X.shape[0], 1))
        return float(poisson_rows(X, y, params, self.full_nll, R)), [(X, R)]

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        return np.exp(X.astype(np.float64) @ params[:self.d] + params[self.d])

    def weight_mask(self) -> np.ndarray:
        m = np.ones(self.d + 1)
        m[self.d] = 0.0
        return m
