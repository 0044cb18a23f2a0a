"""Full BFGS on its own: the O(d^2) update against the textbook formula, convergence, state, size limit."""

from __future__ import annotations

import numpy as np
import pytest

from fleetmpi.errors import CheckpointError
from fleetmpi.optim.bfgs import BFGS, MAX_MATRIX_BYTES, bfgs_update, size_refusal
from fleetmpi.optim.lbfgs import LBFGS, backtrack
from fleetmpi.spec import BfgsSpec, LbfgsSpec


def _quadratic(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((d, d))
    A = Q @ Q.T + d * np.eye(d)          # symmetric positive definite, condition ~ a few
    return A, rng.standard_normal(d)


def test_update_matches_the_direct_formula_on_a_quadratic() -> None:
    d = 300                               # more rows than one block of the in-place update
    A, _ = _quadratic(d, 1)
    rng = np.random.default_rng(2)
    M = rng.standard_normal((d, d))
    H = M @ M.T / d + np.eye(d)               # a random symmetric positive definite start
    for _ in range(3):
        s = rng.standard_normal(d)
        y = A @ s                         # a quadratic's gradient change: s'y > 0
        r = 1.0 / (s @ y)
        eye = np.eye(d)
        want = (eye - r * np.outer(s, y)) @ H @ (eye - r * np.outer(y, s)) + r * np.outer(s, s)
        bfgs_update(H, s, y)
        np.testing.assert_allclose(H, want, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(H @ y, s, rtol=1e-8)    # the secant condition


def test_first_update_scales_h0_and_skips_non_positive_curvature() -> None:
    d = 7
    rng = np.random.default_rng(3)
    opt = BFGS(BfgsSpec(), d)
    s, y = rng.standard_normal(d), rng.standard_normal(d)
    if s @ y > 0:
        y = -y
    assert not opt.update(s, y) and not opt.curved and not opt.H.any()
    y = y + 2 * (abs(s @ y) / (s @ s) + 1.0) * s       # now s'y > 0
    assert opt.update(s, y) and opt.curved
    H0 = (s @ y) / (y @ y) * np.eye(d)
    r = 1.0 / (s @ y)
    want = (np.eye(d) - r * np.outer(s, y)) @ H0 @ (np.eye(d) - r * np.outer(y, s)) + r * np.outer(s, s)
    np.testing.assert_allclose(opt.H, want, rtol=1e-12, atol=1e-15)


def test_bfgs_minimises_a_quadratic_in_about_d_iterations_and_first_step_equals_lbfgs() -> None:
    d = 20
    A, b = _quadratic(d, 4)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * float(w @ A @ w) - float(b @ w), A @ w - b

    w = np.random.default_rng(5).standard_normal(d)
    w_l = w.copy()
    opt = BFGS(BfgsSpec(tol_grad=1e-10), d)
    LBFGS(LbfgsSpec(), d).step(w_l, objective)
    opt.step(w, objective)
    np.testing.assert_array_equal(w, w_l)          # before any curvature both take -g / max(1, |g|_1)
    losses = [opt.f]
    while float(np.linalg.norm(opt.g)) > 1e-6:
        f, moved = opt.step(w, objective)
        assert moved, len(losses)
        losses.append(f)
    assert len(losses) <= 2 * d                      # superlinear: about d iterations, not hundreds
    assert all(b_ <= a_ for a_, b_ in zip(losses, losses[1:]))
    np.testing.assert_allclose(w, np.linalg.solve(A, b), rtol=1e-6, atol=1e-8)
    assert opt.curved and np.linalg.eigvalsh(0.5 * (opt.H + opt.H.T)).min() > 0   # H stayed positive definite


def test_backtrack_halves_until_armijo_holds() -> None:
    calls: list[float] = []

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        calls.append(float(w[0]))
        return float(w[0] ** 2), 2 * w

    w = np.array([1.0])
    found, evals = backtrack(w, np.array([-8.0]), 1.0, -16.0, objective, 20, 1e-4)
    assert found is not None and evals == len(calls) == 4 and found[0] == 0.125
    assert calls == [-7.0, -3.0, -1.0, 0.0] and found[2] == 0.0
    found, evals = backtrack(w, np.array([-8.0]), 1.0, -16.0, objective, 2, 1e-4)
    assert found is None and evals == 2


def test_state_round_trips_and_another_parameter_count_is_refused() -> None:
    d = 9
    A, b = _quadratic(d, 6)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        return 0.5 * float(w @ A @ w) - float(b @ w), A @ w - b

    w = np.random.default_rng(7).standard_normal(d)
    a = BFGS(BfgsSpec(), d)
    for _ in range(3):
        a.step(w, objective)
    st = {k: v.copy() for k, v in a.state().items()}
    assert set(st) == {"bfgs_H", "bfgs_g", "bfgs_f"} and st["bfgs_H"].any()
    b2 = BFGS(BfgsSpec(), d)
    b2.load_state(st)
    assert b2.curved and b2.f == a.f
    w2 = w.copy()
    a.step(w, objective)
    b2.step(w2, objective)
    np.testing.assert_array_equal(w, w2)            # the next iteration is the same: curvature kept
    with pytest.raises(CheckpointError, match=r"ckpt.h5: bfgs_H has shape \(9, 9\) but the model has 10"):
        BFGS(BfgsSpec(), d + 1).load_state(st, "ckpt.h5")


def test_size_limit_refuses_past_200_mb_with_a_pointer_to_lbfgs() -> None:
    assert MAX_MATRIX_BYTES == 200_000_000
    assert size_refusal(5000) is None
    msg = size_refusal(5001)
    assert msg == ("bfgs keeps a d x d matrix: 5001 parameters need 200.1 MB (limit 200 MB); "
                   "use optimizer lbfgs")
    with pytest.raises(ValueError, match="use optimizer lbfgs"):
        BFGS(BfgsSpec(), 5001)
