"""One-pass optimizer updates (kernels.update) and the CSR evaluation kernel, bit for bit against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetmpi import spec as specmod
from fleetmpi.errors import BadInput
from fleetmpi.models.base import Model
from fleetmpi.models.softmax import SoftmaxRegression
from fleetmpi.optim import SGD, Adagrad
from fleetmpi.optim.adagrad import EPS
from fleetmpi.spec import OptimizerSpec
from kernels import sparse, update


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2718)


@pytest.mark.parametrize("l2", [0.0, 1e-3])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_dense_is_the_numpy_sequence(rng: np.random.Generator, l2: float, momentum: float) -> None:
    n, B, lr = 1001, 24, 0.37          # B not a power of two: g / B must stay a division
    p, v = rng.standard_normal(n), rng.standard_normal(n)
    mask = (rng.random(n) < 0.9).astype(np.float64)
    for _ in range(3):
        g = rng.standard_normal(n) * 10.0
        grad = g / B
        if l2:
            grad += l2 * mask * p
        want_p, want_v = p.copy(), v.copy()
        if momentum:
            want_v *= momentum
            want_v += grad
            want_p -= lr * want_v
        else:
            want_p -= lr * grad
        update.sgd_dense(p, g, B, l2, mask, v, momentum, lr)
        assert np.array_equal(p, want_p) and np.array_equal(v, want_v)


@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_adagrad_dense_is_the_numpy_formula(rng: np.random.Generator, l2: float) -> None:
    n, B, lr = 777, 10, 0.5
    p, acc = rng.standard_normal(n), np.zeros(n)
    mask = (rng.random(n) < 0.9).astype(np.float64)
    for _ in range(3):
        g = rng.standard_normal(n)
        grad = g / B
        if l2:
            grad += l2 * mask * p
        want_acc = acc + grad * grad
        want_p = p - lr * (grad / (np.sqrt(want_acc) + EPS))
        update.adagrad_dense(p, g, B, l2, mask, acc, lr, EPS)
        assert np.array_equal(p, want_p) and np.array_equal(acc, want_acc)


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_row_updates_equal_dense_where_the_gradient_is_zero_elsewhere(rng: np.random.Generator, kind: str) -> None:
    d, k, B = 500, 3, 7
    spec = OptimizerSpec(kind=kind, lr=0.2, batch=B)
    cls = Adagrad if kind == "adagrad" else SGD
    dense, rows = cls(spec, (d + 1) * k), cls(spec, (d + 1) * k)
    p = rng.standard_normal((d + 1) * k)
    q = p.copy()
    mask = np.ones_like(p)
    for _ in range(4):
        touched = rng.choice(d, 40, replace=False).astype(np.int32)
        G = np.zeros((d + 1, k))
        G[touched] = rng.standard_normal((40, k))
        G[touched[:5]] = 0.0                   # touched but summed to zero: still exact
        G[d] = rng.standard_normal(k)
        dense.apply_sum(p, G.ravel(), B, 0.0, mask, 0.2)
        rows.apply_sum(q, G.ravel(), B, 0.0, mask, 0.2, touched, k)
        assert np.array_equal(p, q)


def test_clear_rows_then_zeroed_gradient_equals_a_fresh_one(rng: np.random.Generator) -> None:
    d, k = 400, 5
    W = rng.standard_normal((d + 1) * k)
    g = np.empty_like(W)
    X1 = sparse.CsrBatch.from_dense(np.where(rng.random((30, d)) < 0.03, rng.standard_normal((30, d)), 0.0))
    X2 = sparse.CsrBatch.from_dense(np.where(rng.random((30, d)) < 0.03, rng.standard_normal((30, d)), 0.0))
    y = rng.integers(0, k, 30).astype(np.float32)
    sparse.softmax_grad(X1, y, W, k, g)
    update.clear_rows(g, np.unique(X1.indices), k)
    assert not g.any()
    loss = sparse.softmax_grad(X2, y, W, k, g, zeroed=True)
    fresh = np.full_like(W, np.nan)
    assert loss == sparse.softmax_grad(X2, y, W, k, fresh)
    assert np.array_equal(g, fresh)


def test_softmax_eval_equals_gradient_loss_and_predicted_classes(rng: np.random.Generator) -> None:
    d, k, n = 300, 4, 200
    D = np.where(rng.random((n, d)) < 0.05, rng.standard_normal((n, d)), 0.0)
    D[:20] = 0.0
    X = sparse.CsrBatch.from_dense(D)
    y = rng.integers(0, k, n).astype(np.float32)
    y[:20] = 0.0
    model = SoftmaxRegression(d, k, 0.0)
    W = rng.standard_normal((d + 1) * k)
    W[d * k:d * k + 2] = 50.0            # empty rows tie classes 0 and 1: the first of equal maxima wins
    want = Model.eval_sums(model, X, y, W)
    assert model.eval_sums(X, y, W) == want
    assert 0 < want[1] < n


def test_adagrad_refuses_momentum(tmp_path: Path) -> None:
    raw = {"name": "a", "data": {"train": "t.h5"}, "model": {"kind": "softmax"}, "goal": {"max_steps": 5},
           "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1}}},
           "optimizer": {"kind": "adagrad", "lr": 0.5, "momentum": 0.9}}
    with pytest.raises(BadInput, match=r"momentum.*adagrad takes no momentum"):
        specmod.from_raw(raw, "spec.yaml", tmp_path)
    assert specmod.from_raw({**raw, "optimizer": {"kind": "adagrad", "lr": 0.5}}, "spec.yaml",
                            tmp_path).optimizer.kind == "adagrad"


def test_optimizer_state_that_never_moved_is_left_out_and_loads_as_fresh(rng: np.random.Generator) -> None:
    from fleetmpi.optim import LBFGS
    from fleetmpi.spec import LbfgsSpec
    sgd, lb = SGD(OptimizerSpec(momentum=0.9), 10), LBFGS(LbfgsSpec(), 10)
    assert sgd.state() == {} and lb.state() == {}
    update.sgd_dense(rng.standard_normal(10), rng.standard_normal(10), 4, 0.0, np.ones(10), sgd.velocity, 0.9, 0.1)
    lb.f = 1.5
    assert set(sgd.state()) == {"sgd_velocity"} and set(lb.state()) == {"lbfgs_S", "lbfgs_Y", "lbfgs_g", "lbfgs_f"}
    fresh = SGD(OptimizerSpec(momentum=0.9), 10)
    fresh.load_state({})
    assert not fresh.velocity.any()
    fresh.load_state(sgd.state())
    assert np.array_equal(fresh.velocity, sgd.velocity)
