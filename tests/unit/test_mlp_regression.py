"""The regression MLP (one identity output, squared error): cpu kernel, per-row factors and FD against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from fleetmpi.models import build_model, task_of
from fleetmpi.spec import ModelSpec
from kernels import cpu_mlp, exact
from kernels import reference as ref

D = 7
SIZES = [(D, 9, 1), (D, 8, 5, 1)]


def _problem(sizes: tuple[int, ...], n: int, seed: int, dtype: type = np.float32
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return random (X, y, params): real targets, no zeros."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    y = (2.0 * rng.standard_normal(n) + 0.5).astype(np.float32)
    return X, y, 0.5 * rng.standard_normal(ref.mlp_param_count(sizes))


def _close(a: np.ndarray | float, b: np.ndarray | float, rtol: float) -> None:
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("n", [301, 1])
def test_cpu_kernel_matches_reference(sizes: tuple[int, ...], n: int) -> None:
    X, y, p = _problem(sizes, n, seed=n)
    g = np.full_like(p, np.nan)
    loss = cpu_mlp.mlp_regression_grad(X, y, p, sizes, g)
    loss_ref, g_ref = ref.mlp_regression_loss_grad(X, y, p, sizes)
    assert loss > 0.0
    _close(loss, loss_ref, 1e-11)
    _close(g, g_ref, 1e-11)
    assert ref.mlp_unpack(g, sizes)[-1][1][0] != 0.0      # the output bias sums the residuals
    out = np.full(n, np.nan)
    cpu_mlp.mlp_regression_predict(X, p, sizes, out)
    _close(out, ref.mlp_regression_predict(X, p, sizes), 1e-12)
    # the loss is 0.5 * squared error of the predictions
    _close(loss, 0.5 * float(((out - y) ** 2).sum()), 1e-11)


@pytest.mark.parametrize("sizes", SIZES)
def test_reference_gradient_matches_finite_differences(sizes: tuple[int, ...]) -> None:
    X, y, p = _problem(sizes, 211, seed=5, dtype=np.float64)
    a = X
    for W, b in ref.mlp_unpack(p, sizes)[:-1]:
        pre = a @ W + b
        assert np.min(np.abs(pre)) > 1e-5                  # FD across a ReLU kink would mean nothing
        a = np.maximum(pre, 0.0)
    _, g = ref.mlp_regression_loss_grad(X, y, p, sizes)
    fd = np.empty_like(p)
    h = 1e-6
    for i in range(p.size):
        q = p.copy()
        q[i] += h
        up = ref.mlp_regression_loss_grad(X, y, q, sizes)[0]
        q[i] -= 2 * h
        fd[i] = (up - ref.mlp_regression_loss_grad(X, y, q, sizes)[0]) / (2 * h)
    _close(fd, g, 1e-6)


def test_row_factors_give_the_gradient_and_do_not_depend_on_the_batch() -> None:
    sizes = SIZES[1]
    X, y, p = _problem(sizes, 97, seed=8)
    loss, factors = exact.mlp_rows(X, y, p, sizes, regression=True)
    loss_ref, g_ref = ref.mlp_regression_loss_grad(X, y, p, sizes)
    _close(loss, loss_ref, 1e-12)
    # Each layer's gradient is U^T V, and its bias the column sums of V (exact sync's layout).
    g = np.concatenate([np.r_[(U.astype(np.float64).T @ V).ravel(), V.sum(axis=0)] for U, V in factors])
    _close(g, g_ref, 1e-11)
    for i in (0, 40, 96):
        _, one = exact.mlp_rows(X[i:i + 1].copy(), y[i:i + 1].copy(), p, sizes, regression=True)
        for (_, V), (_, v) in zip(factors, one):
            np.testing.assert_array_equal(V[i], v[0])


def test_kernels_refuse_a_wider_output() -> None:
    X, y, p = _problem((D, 4, 2), 5, seed=1)
    with pytest.raises(ValueError, match="one output unit"):
        cpu_mlp.mlp_regression_grad(X, y, p, (D, 4, 2), np.empty_like(p))
    with pytest.raises(ValueError, match="one output unit"):
        ref.mlp_regression_loss_grad(X, y, p, (D, 4, 2))
    with pytest.raises(ValueError, match="one output unit"):
        exact.mlp_rows(X, y, p, (D, 4, 2), regression=True)


def test_model_task_regression_builds_a_one_output_forecaster() -> None:
    spec = ModelSpec(kind="mlp", hidden=(9,), task="regression", l2=1e-3)
    assert task_of(spec) == "regression"
    model = build_model(spec, D, None)
    assert model.task == "regression" and model.n_params == ref.mlp_param_count((D, 9, 1))
    X, y, p = _problem((D, 9, 1), 50, seed=3)
    g = np.empty(model.n_params)
    _close(model.loss_grad_sum(X, y, p, g), ref.mlp_regression_loss_grad(X, y, p, (D, 9, 1))[0], 1e-11)
    assert model.predict(X, p).shape == (50,)
    assert model.meta()["task"] == "regression" and model.meta()["classes"] is None
    assert task_of(ModelSpec(kind="mlp", hidden=(9,))) == "multiclass"
