"""CSR kernels (kernels.sparse) against scipy.sparse and kernels.reference on random rows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from kernels import exact, reference, sparse


def random_csr(rng: np.random.Generator, n: int, d: int, density: float = 0.05) -> sparse.CsrBatch:
    """Return n random CSR rows over d columns, some of them empty, sorted unique columns per row."""
    D = np.where(rng.random((n, d)) < density, rng.standard_normal((n, d)), 0.0).astype(np.float32)
    D[rng.choice(n, max(1, n // 5), replace=False)] = 0.0   # empty rows
    D[:, rng.choice(d, max(1, d // 8), replace=False)] = 0.0   # columns no row touches
    M = sp.csr_matrix(D)
    M.sort_indices()
    return sparse.CsrBatch(M.indptr.astype(np.int64), M.indices.astype(np.int32), M.data.astype(np.float32), d)


def scipy_of(X: sparse.CsrBatch) -> sp.csr_matrix:
    return sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1414)


def test_linear_and_logistic_match_scipy(rng: np.random.Generator) -> None:
    X = random_csr(rng, 300, 97)
    S = scipy_of(X)
    w = rng.standard_normal(98)
    y = rng.standard_normal(300).astype(np.float32)
    g = np.empty(98)
    loss = sparse.linear_grad(X, y, w, g)
    r = S @ w[:97] + w[97] - y
    np.testing.assert_allclose(loss, 0.5 * r @ r, rtol=1e-12)
    np.testing.assert_allclose(g[:97], S.T @ r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g[97], r.sum(), rtol=1e-12)
    ref_loss, ref_g = reference.csr_linear_loss_grad(X.indptr, X.indices, X.data, 97, y, w)
    np.testing.assert_allclose(g, ref_g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sparse.linear_predict(X, w), S @ w[:97] + w[97], rtol=1e-12)

    yb = (rng.random(300) < 0.4).astype(np.float32)
    loss = sparse.logistic_grad(X, yb, w, g)
    z = S @ w[:97] + w[97]
    p = 1.0 / (1.0 + np.exp(-z))
    np.testing.assert_allclose(loss, np.sum(np.logaddexp(0.0, z) - yb * z), rtol=1e-12)
    np.testing.assert_allclose(g[:97], S.T @ (p - yb), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g[97], (p - yb).sum(), rtol=1e-10)
    ref_loss, ref_g = reference.csr_logistic_loss_grad(X.indptr, X.indices, X.data, 97, yb, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(sparse.logistic_predict_proba(X, w), p, rtol=1e-12)


def test_softmax_matches_scipy_and_reference(rng: np.random.Generator) -> None:
    n, d, k = 250, 61, 5
    X = random_csr(rng, n, d, 0.08)
    S = scipy_of(X)
    W = rng.standard_normal((d + 1) * k)
    y = rng.integers(0, k, n).astype(np.float32)
    g = np.empty_like(W)
    loss = sparse.softmax_grad(X, y, W, k, g)
    Wm = W.reshape(d + 1, k)
    Z = S @ Wm[:d] + Wm[d]
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    D = P.copy()
    D[np.arange(n), y.astype(int)] -= 1.0
    lse = np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1)
    np.testing.assert_allclose(loss, np.sum(lse - Z[np.arange(n), y.astype(int)]), rtol=1e-12)
    G = g.reshape(d + 1, k)
    np.testing.assert_allclose(G[:d], S.T @ D, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(G[d], D.sum(0), rtol=1e-10, atol=1e-12)
    _, ref_g = reference.csr_softmax_loss_grad(X.indptr, X.indices, X.data, d, y, W, k)
    np.testing.assert_allclose(g, ref_g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sparse.softmax_predict_proba(X, W, k), P, rtol=1e-12)
    # Columns no row touches get exactly zero gradient: what sync: sparse relies on.
    untouched = np.setdiff1d(np.arange(d), X.indices)
    assert untouched.size and not G[untouched].any()


def test_softmax_gradient_matches_finite_differences(rng: np.random.Generator) -> None:
    n, d, k = 40, 13, 3
    X = random_csr(rng, n, d, 0.3)
    W = rng.standard_normal((d + 1) * k) * 0.3
    y = rng.integers(0, k, n).astype(np.float32)
    g = np.empty_like(W)
    sparse.softmax_grad(X, y, W, k, g)
    scratch = np.empty_like(W)
    h = 1e-6
    for j in rng.choice(W.size, 12, replace=False):
        e = np.zeros_like(W)
        e[j] = h
        fd = (sparse.softmax_grad(X, y, W + e, k, scratch) - sparse.softmax_grad(X, y, W - e, k, scratch)) / (2 * h)
        assert fd == pytest.approx(g[j], rel=1e-5, abs=1e-7)


def test_logistic_gradient_matches_finite_differences(rng: np.random.Generator) -> None:
    X = random_csr(rng, 50, 17, 0.3)
    w = rng.standard_normal(18) * 0.3
    y = (rng.random(50) < 0.5).astype(np.float32)
    g, scratch = np.empty(18), np.empty(18)
    sparse.logistic_grad(X, y, w, g)
    for j in range(18):
        e = np.zeros(18)
        e[j] = 1e-6
        fd = (sparse.logistic_grad(X, y, w + e, scratch) - sparse.logistic_grad(X, y, w - e, scratch)) / 2e-6
        assert fd == pytest.approx(g[j], rel=1e-5, abs=1e-7)


def test_empty_batch_gives_zero_gradient(rng: np.random.Generator) -> None:
    X = sparse.CsrBatch(np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), 9)
    g = rng.standard_normal(10 * 3)
    assert sparse.softmax_grad(X, np.empty(0, np.float32), rng.standard_normal(30), 3, g) == 0.0
    assert not g.any()


def test_exact_factors_on_csr_give_the_dense_integers(rng: np.random.Generator) -> None:
    """The fixed-point sum of CSR factors equals the dense one, and any split of rows gives the same ints."""
    n, d, k = 120, 33, 4
    X = random_csr(rng, n, d, 0.1)
    W = rng.standard_normal((d + 1) * k)
    y = rng.integers(0, k, n).astype(np.float32)
    loss_s, [(U, V)] = sparse.softmax_rows(X, y, W, k)
    loss_d, [(Ud, Vd)] = exact.softmax_rows(X.toarray(), y, W, k)
    assert loss_s == loss_d and np.array_equal(V, Vd)
    scale = exact.fixed_scale(max(exact.row_bound(U, V), exact.row_bound(Ud, Vd)), n)
    assert exact.row_bound(U, V) == exact.row_bound(Ud, Vd)
    acc_s, acc_d = np.zeros((d + 1) * k, np.int64), np.zeros((d + 1) * k, np.int64)
    exact.fixed_accumulate(U, V, scale, acc_s)
    exact.fixed_accumulate(Ud, Vd, scale, acc_d)
    assert np.array_equal(acc_s, acc_d) and acc_s.any()
    parts = np.zeros_like(acc_s)
    for lo, hi in ((0, 37), (37, 38), (38, n)):
        sub = sparse.CsrBatch(X.indptr[lo:hi + 1] - X.indptr[lo], X.indices[X.indptr[lo]:X.indptr[hi]],
                              X.data[X.indptr[lo]:X.indptr[hi]], d)
        _, [(Us, Vs)] = sparse.softmax_rows(sub, y[lo:hi], W, k)
        exact.fixed_accumulate(Us, Vs, scale, parts)
    assert np.array_equal(parts, acc_s)


def test_mark_columns_returns_the_distinct_ids(rng: np.random.Generator) -> None:
    ix = rng.integers(0, 500, 2000).astype(np.int32)
    seen = np.zeros(500, np.bool_)
    out = np.empty(ix.size, np.int32)
    m = sparse.mark_columns(ix, seen, out)
    assert np.array_equal(np.sort(out[:m]), np.unique(ix)) and not seen.any()


def test_batch_refuses_bad_arrays() -> None:
    with pytest.raises(TypeError, match="indices"):
        sparse.CsrBatch(np.array([0, 1], np.int64), np.array([0], np.int64), np.array([1.0], np.float32), 3)
    with pytest.raises(ValueError, match="nnz"):
        sparse.CsrBatch(np.array([0, 2], np.int64), np.array([0], np.int32), np.array([1.0], np.float32), 3)
