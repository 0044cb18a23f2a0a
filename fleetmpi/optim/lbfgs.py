"""Limited-memory BFGS, and the deterministic backtracking (Armijo) line search BFGS shares.

Every rank runs the same arithmetic on the same allreduced loss and gradient, so every
rank takes the same branch; the objective callable is collective.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleetmpi.spec import LbfgsSpec

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]
# (step length t, trial point, objective and gradient there) of an accepted line search
Accepted = tuple[float, np.ndarray, float, np.ndarray]


def backtrack(params: np.ndarray, d: np.ndarray, f0: float, slope: float, objective: Objective,
              max_ls: int, c1: float) -> tuple[Accepted | None, int]:
    """Halve t from 1 until ``f(params + t d) <= f0 + c1 t slope`` (Armijo); return (accepted or None, evals).

    Deterministic (no interpolation), so every rank evaluates the same trial points.
    """
    t = 1.0
    for i in range(max_ls):
        trial = params + t * d
        f1, g1 = objective(trial)
        if np.isfinite(f1) and f1 <= f0 + c1 * t * slope:
            return (t, trial, f1, g1), i + 1
        t *= 0.5
    return None, max_ls


def curvature_ok(s: np.ndarray, y: np.ndarray) -> bool:
    """Return whether step ``s`` and gradient change ``y`` give positive curvature worth keeping."""
    # Relative to y'y: an absolute eps would skip every pair of a badly scaled objective.
    return float(s @ y) > 1e-12 * float(y @ y)


class LBFGS:
    name = "lbfgs"

    def __init__(self, spec: LbfgsSpec, n_params: int) -> None:
        self.spec = spec
        self.S = np.zeros((0, n_params))
        self.Y = np.zeros((0, n_params))
        self.f: float | None = None
        self.g = np.zeros(n_params)
        self.last_step = 0.0
        self.evals = 0

    def _direction(self, g: np.ndarray) -> np.ndarray:
        q = g.copy()
        m = self.S.shape[0]
        alpha = np.empty(m)
        rho = 1.0 / np.einsum("ij,ij->i", self.Y, self.S) if m else np.empty(0)
        for i in range(m - 1, -1, -1):
            alpha[i] = rho[i] * (self.S[i] @ q)
            q -= alpha[i] * self.Y[i]
        if m:
            q *= (self.S[-1] @ self.Y[-1]) / (self.Y[-1] @ self.Y[-1])
        else:
            q /= max(1.0, float(np.abs(g).sum()))  # first step: bounded steepest descent
        for i in range(m):
            beta = rho[i] * (self.Y[i] @ q)
            q += (alpha[i] - beta) * self.S[i]
        return -q

    def step(self, params: np.ndarray, objective: Objective) -> tuple[float, bool]:
        """Take one iteration in place; return (loss at the new point, whether it moved)."""
        if self.f is None:
            self.f, g = objective(params)
            self.g = g.copy()
            self.evals += 1
        f0, g0 = self.f, self.g
        if float(np.linalg.norm(g0)) <= self.spec.tol_grad:
            return f0, False
        d = self._direction(g0)
        slope = float(g0 @ d)
        if slope >= 0:  # not a descent direction: history is stale, restart from -g
            self.S = self.S[:0]
            self.Y = self.Y[:0]
            d = self._direction(g0)
            slope = float(g0 @ d)
        found, evals = backtrack(params, d, f0, slope, objective, self.spec.max_ls, self.spec.c1)
        self.evals += evals
        if found is not None:
            t, trial, f1, g1 = found
            s, y = trial - params, g1 - g0
            if curvature_ok(s, y):
                self.S = np.vstack([self.S, s])[-self.spec.history:]
                self.Y = np.vstack([self.Y, y])[-self.spec.history:]
            params[...] = trial
            self.f, self.g, self.last_step = f1, g1.copy(), t
            return f1, True
        # No acceptable step: drop the curvature history and keep the point.
        self.S, self.Y, self.last_step = self.S[:0], self.Y[:0], 0.0
        return f0, False

    def state(self) -> dict[str, np.ndarray]:
        """Return history, gradient and objective under their checkpoint names (f NaN: none yet)."""
        f = np.array([np.nan if self.f is None else self.f])
        return {"lbfgs_S": self.S, "lbfgs_Y": self.Y, "lbfgs_g": self.g, "lbfgs_f": f}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the history from a checkpoint's arrays where it fits the model (every rank)."""
        if "lbfgs_S" in arrays and arrays["lbfgs_S"].shape[1:] == self.S.shape[1:]:
            self.S, self.Y = arrays["lbfgs_S"].copy(), arrays["lbfgs_Y"].copy()
            self.g = arrays["lbfgs_g"].copy()
            f = float(arrays["lbfgs_f"][0])
            self.f = None if np.isnan(f) else f
