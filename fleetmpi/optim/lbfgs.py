"""Limited-memory BFGS, and what BFGS shares with it: the deterministic backtracking (Armijo)
line search and one quasi-Newton iteration (``QuasiNewton.step``).

Every rank runs the same arithmetic on the same allreduced loss and gradient, so every
rank takes the same branch; the objective callable is collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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


class LineSearchSettings(Protocol):
    """The settings an iteration reads (LbfgsSpec and BfgsSpec both have them)."""

    @property
    def tol_grad(self) -> float: ...
    @property
    def max_ls(self) -> int: ...
    @property
    def c1(self) -> float: ...


class QuasiNewton:
    """One iteration of a quasi-Newton method; subclasses say how curvature is kept.

    ``direction(g)`` is the search direction from the kept curvature, ``update(s, y)`` takes a
    step's curvature in, ``reset()`` drops it. State: ``f``, ``g`` at the current point,
    ``last_step`` (the accepted t), ``evals``; ``spec`` has tol_grad, max_ls and c1.
    """

    spec: LineSearchSettings
    f: float | None
    g: np.ndarray
    last_step: float
    evals: int

    def direction(self, g: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, s: np.ndarray, y: np.ndarray) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, params: np.ndarray, objective: Objective) -> tuple[float, bool]:
        """Take one iteration in place; return (loss at the new point, whether it moved)."""
        if self.f is None:
            self.f, g = objective(params)
            self.g = g.copy()
            self.evals += 1
        f0, g0 = self.f, self.g
        if float(np.linalg.norm(g0)) <= self.spec.tol_grad:
            return f0, False
        d = self.direction(g0)
        slope = float(g0 @ d)
        if slope >= 0:  # not a descent direction: the curvature is stale, restart from -g
            self.reset()
            d = self.direction(g0)
            slope = float(g0 @ d)
        found, evals = backtrack(params, d, f0, slope, objective, self.spec.max_ls, self.spec.c1)
        self.evals += evals
        if found is None:
            # No acceptable step: drop the curvature and keep the point.
            self.reset()
            self.last_step = 0.0
            return f0, False
        t, trial, f1, g1 = found
        self.update(trial - params, g1 - g0)
        params[...] = trial
        self.f, self.g, self.last_step = f1, g1.copy(), t
        return f1, True


class LBFGS(QuasiNewton):
    """L-BFGS: the newest ``history`` (s, y) pairs, two-loop recursion."""

    name = "lbfgs"

    def __init__(self, spec: LbfgsSpec, n_params: int) -> None:
        self.spec: LbfgsSpec = spec
        self.S = np.zeros((0, n_params))
        self.Y = np.zeros((0, n_params))
        self.f: float | None = None
        self.g = np.zeros(n_params)
        self.last_step = 0.0
        self.evals = 0

    def direction(self, g: np.ndarray) -> np.ndarray:
        """Return the two-loop direction -H g from the kept pairs (first step: -g / max(1, |g|_1))."""
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

    def update(self, s: np.ndarray, y: np.ndarray) -> bool:
        """Keep the pair (s, y) when its curvature is positive (dropping the oldest beyond ``history``); say if kept."""
        if not curvature_ok(s, y):
            return False
        self.S = np.vstack([self.S, s])[-self.spec.history:]
        self.Y = np.vstack([self.Y, y])[-self.spec.history:]
        return True

    def reset(self) -> None:
        """Drop the history (the next direction is bounded steepest descent)."""
        self.S, self.Y = self.S[:0], self.Y[:0]

    def state(self) -> dict[str, np.ndarray]:
        """Return history, gradient and objective under their checkpoint names (f NaN: none yet).

        {} while there is neither history nor an objective (L-BFGS never ran): that is the
        fresh state ``load_state`` keeps, and g (8 bytes per parameter) means nothing then.
        """
        if self.f is None and not self.S.shape[0]:
            return {}
        f = np.array([np.nan if self.f is None else self.f])
        return {"lbfgs_S": self.S, "lbfgs_Y": self.Y, "lbfgs_g": self.g, "lbfgs_f": f}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the history from a checkpoint's arrays where it fits the model (every rank)."""
        if "lbfgs_S" in arrays and arrays["lbfgs_S"].shape[1:] == self.S.shape[1:]:
            self.S, self.Y = arrays["lbfgs_S"].copy(), arrays["lbfgs_Y"].copy()
            self.g = arrays["lbfgs_g"].copy()
            f = float(arrays["lbfgs_f"][0])
            self.f = None if np.isnan(f) else f
