"""The shared lengthscale's gradient from the Gram's own pass (chunk_stats) against the two-pass rows and FD."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetmpi.models.gp import (
    chunk_stats,
    draw_frequencies,
    fit_stats,
    lengthscale_grad_rows,
    phase,
    shared_lengthscale_grad,
    split_theta,
)


def _problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((60, 3))
    y = np.sin(X[:, 0]) + 0.3 * X[:, 1] + 0.1 * rng.standard_normal(60)
    omega, b = draw_frequencies("rbf", 3, 24, seed)
    return X, y, omega, b, np.array([math.log(1.3), math.log(0.8), math.log(0.05)])


def _lml(X: np.ndarray, y: np.ndarray, omega: np.ndarray, b: np.ndarray, theta: np.ndarray) -> float:
    """Return log N(y | 0, Phi Phi^T + e I) by the n x n formula."""
    ls, s, e = split_theta(theta)
    Phi = math.sqrt(2 * s / omega.shape[0]) * np.cos(phase(X, omega, b, ls))
    C = Phi @ Phi.T + e * np.eye(len(y))
    return float(-0.5 * y @ np.linalg.solve(C, y) - 0.5 * np.linalg.slogdet(C)[1] - 0.5 * len(y) * math.log(2 * math.pi))


def test_fused_statistics_give_the_gram_and_the_two_pass_gradient() -> None:
    X, y, omega, b, theta = _problem(3)
    ls, s, e = split_theta(theta)
    parts = [chunk_stats(X[a:a + 20], y[a:a + 20], omega, b, ls, True) for a in (0, 20, 40)]
    gram = sum(g for g, _ in parts)
    dstats = sum(d for _, d in parts if d is not None)
    B = np.c_[np.cos(phase(X, omega, b, ls)), y]
    np.testing.assert_allclose(gram, B.T @ B, rtol=1e-12, atol=1e-12)
    assert chunk_stats(X, y, omega, b, ls, False)[1] is None
    fit = fit_stats(gram, len(y), s, e)
    two_pass = lengthscale_grad_rows(X, y, omega, b, ls, fit)[0]
    fused = shared_lengthscale_grad(dstats, fit)
    assert fused == pytest.approx(two_pass, rel=1e-10)
    h = 1e-5
    up, dn = theta.copy(), theta.copy()
    up[0] += h
    dn[0] -= h
    fd = (_lml(X, y, omega, b, up) - _lml(X, y, omega, b, dn)) / (2 * h)
    assert fused == pytest.approx(fd, rel=1e-5, abs=1e-6)
