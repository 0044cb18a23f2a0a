"""Test kernels.cpu against kernels.reference, and the references against FD."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from numba import njit

from kernels import cpu, cpu_glm, cpu_mlp, vmath
from kernels import reference as ref

D = 13
K = 4
MLP_SIZES = [(D, 8, K), (D, 8, 6, K)]
KINDS = ["linear", "logistic", "softmax", "mlp3", "mlp4"]

# cpu and reference differ only in summation order on float64 sums of exactly
# representable float32 products, so they agree to a few ulps times log(n).
RTOL = 1e-11


def assert_close(
    actual: np.ndarray | float, expected: np.ndarray | float, rtol: float = RTOL
) -> None:
    """Assert elementwise closeness, with an absolute floor of rtol * max |expected|."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _sizes(kind: str) -> tuple[int, ...]:
    """Return the MLP layer widths for an mlp kind."""
    return MLP_SIZES[0] if kind == "mlp3" else MLP_SIZES[1]


def _problem(
    kind: str, n: int, seed: int = 0, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return random (X, y, params) for a model kind: no zeros, labels of its sort."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, D)).astype(dtype)
    if kind == "linear":
        y = rng.standard_normal(n).astype(np.float32)
        p = 0.5 * rng.standard_normal(D + 1)
    elif kind == "logistic":
        y = (rng.random(n) < 0.5).astype(np.float32)
        p = 0.5 * rng.standard_normal(D + 1)
    elif kind == "softmax":
        y = rng.integers(0, K, n).astype(np.float32)
        p = 0.5 * rng.standard_normal((D + 1) * K)
    else:
        y = rng.integers(0, K, n).astype(np.float32)
        p = 0.5 * rng.standard_normal(ref.mlp_param_count(_sizes(kind)))
    return X, y, p


def _ref_loss_grad(
    kind: str, X: np.ndarray, y: np.ndarray, p: np.ndarray
) -> tuple[float, np.ndarray]:
    """Return the reference (loss sum, gradient sum) for a model kind."""
    if kind == "linear":
        return ref.linear_loss_grad(X, y, p)
    if kind == "logistic":
        return ref.logistic_loss_grad(X, y, p)
    if kind == "softmax":
        return ref.softmax_loss_grad(X, y, p, K)
    return ref.mlp_loss_grad(X, y, p, _sizes(kind))


def _cpu_loss_grad(
    kind: str, X: np.ndarray, y: np.ndarray, p: np.ndarray
) -> tuple[float, np.ndarray]:
    """Return the cpu kernel's (loss sum, gradient sum); g_out starts as NaN garbage."""
    g = np.full_like(p, np.nan)
    if kind == "linear":
        loss = cpu.linear_grad(X, y, p, g)
    elif kind == "logistic":
        loss = cpu.logistic_grad(X, y, p, g)
    elif kind == "softmax":
        loss = cpu.softmax_grad(X, y, p, K, g)
    else:
        loss = cpu_mlp.mlp_grad(X, y, p, _sizes(kind), g)
    assert isinstance(loss, float)
    return loss, g


def _central_diff(
    f: Callable[[np.ndarray], float], p: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Return the central finite-difference gradient of f at p, step h."""
    g = np.empty_like(p)
    for i in range(p.size):
        q = p.copy()
        q[i] = p[i] + h
        up = f(q)
        q[i] = p[i] - h
        g[i] = (up - f(q)) / (2.0 * h)
    return g


def assert_fd_close(fd: np.ndarray, g: np.ndarray) -> None:
    """Assert an analytic gradient matches finite differences within rounding noise."""
    # Loss sums are O(100); rounding in f costs ~eps*|f|/h ~ 1e-8 per coordinate and
    # truncation ~h^2 is smaller still, so 1e-6 relative to the largest entry is honest.
    assert_close(fd, g, rtol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    """Compile every kernel once so individual tests time only their own work."""
    cpu.warmup()


# ------------------------------------------------------------------ cpu vs reference


@pytest.mark.parametrize("n", [257, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_reference(kind: str, n: int) -> None:
    X, y, p = _problem(kind, n, seed=n)
    loss, g = _cpu_loss_grad(kind, X, y, p)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    assert loss > 0.0
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)
    if kind.startswith("mlp"):
        # Dead ReLU units legitimately zero some weights; the output bias never is.
        assert np.all(ref.mlp_unpack(g, _sizes(kind))[-1][1] != 0.0)
    else:
        assert np.all(g != 0.0)


@pytest.mark.parametrize("n", [2, 7, 15, 16, 17, 31, 32, 33, 47])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_block_edges_match_reference(kind: str, n: int) -> None:
    # The logistic kernel works in 16-row blocks (logits in row pairs, gradient in groups
    # of eight), the linear one in 8-row blocks: sizes on and around those edges (odd
    # rows paired with themselves, a partial block, two blocks, a remainder).
    X, y, p = _problem(kind, n, seed=100 + n)
    loss, g = _cpu_loss_grad(kind, X, y, p)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_gives_zero_loss_and_gradient(kind: str) -> None:
    X, y, p = _problem(kind, 0)
    loss, g = _cpu_loss_grad(kind, X, y, p)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    assert loss == 0.0 and loss_ref == 0.0
    assert np.array_equal(g, np.zeros_like(p))
    assert np.array_equal(g_ref, np.zeros_like(p))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_sum_over_rows(kind: str) -> None:
    X, y, p = _problem(kind, 40, seed=3)
    loss, g = _cpu_loss_grad(kind, X, y, p)
    parts = [
        _cpu_loss_grad(kind, X[i : i + 1].copy(), y[i : i + 1].copy(), p)
        for i in range(40)
    ]
    assert_close(loss, sum(lp for lp, _ in parts))
    assert_close(g, np.sum([gp for _, gp in parts], axis=0))


def test_twopass_baseline_matches_reference() -> None:
    X, y, w = _problem("logistic", 257, seed=4)
    loss, g = ref.logistic_loss_grad_twopass(X, y, w)
    loss_ref, g_ref = ref.logistic_loss_grad(X, y, w)
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)


# ------------------------------------------------------------ finite differences


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradient_matches_finite_differences(kind: str) -> None:
    X, y, p = _problem(kind, 257, seed=5, dtype=np.float64)
    _, g = _ref_loss_grad(kind, X, y, p)
    fd = _central_diff(lambda q: _ref_loss_grad(kind, X, y, q)[0], p)
    assert_fd_close(fd, g)


def test_mlp_fd_points_are_away_from_relu_kinks() -> None:
    # FD across a kink would be meaningless; make sure the test above does not do that.
    X, _, p = _problem("mlp4", 257, seed=5, dtype=np.float64)
    a = X
    for W, b in ref.mlp_unpack(p, _sizes("mlp4"))[:-1]:
        pre = a @ W + b
        assert np.min(np.abs(pre)) > 1e-4
        a = np.maximum(pre, 0.0)


def test_finite_difference_check_catches_a_small_error() -> None:
    X, y, p = _problem("softmax", 257, seed=6, dtype=np.float64)
    _, g = ref.softmax_loss_grad(X, y, p, K)
    fd = _central_diff(lambda q: ref.softmax_loss_grad(X, y, q, K)[0], p)
    bad = g.copy()
    bad[7] *= 1.0 + 1e-4
    with pytest.raises(AssertionError):
        assert_fd_close(fd, bad)


# ---------------------------------------------------------------------- stability


def test_logistic_is_finite_for_huge_logits() -> None:
    # Rows chosen so that z = +-800: exp(800) overflows, a naive formula gives inf/nan.
    X = np.zeros((4, 2), dtype=np.float32)
    X[:, 0] = [800.0, 800.0, -800.0, -800.0]
    X[:, 1] = [1.0, -1.0, 1.0, -1.0]  # not all-zero columns
    y = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    w = np.array([1.0, 0.0, 0.0])
    g = np.empty(3)
    loss = cpu.logistic_grad(X, y, w, g)
    loss_ref, g_ref = ref.logistic_loss_grad(X, y, w)
    # Rows 2 and 3 are confidently wrong (loss 800, residual +-1); 1 and 4 are right.
    assert loss == pytest.approx(1600.0, rel=1e-15)
    np.testing.assert_allclose(g, [1600.0, -2.0, 0.0], rtol=1e-15)
    assert np.isfinite(loss_ref) and loss_ref == pytest.approx(loss, rel=1e-15)
    np.testing.assert_allclose(g_ref, g, rtol=1e-15)
    p = np.empty(4)
    cpu.logistic_predict_proba(X, w, p)
    np.testing.assert_array_equal(p, [1.0, 1.0, 0.0, 0.0])


def test_softmax_is_finite_for_huge_logits() -> None:
    rng = np.random.default_rng(7)
    X, y, W = _problem("softmax", 64, seed=7)
    W = W * 2000.0 + rng.standard_normal(
        W.size
    )  # logits of order 1e4, wrong class far below
    g = np.empty_like(W)
    loss = cpu.softmax_grad(X, y, W, K, g)
    loss_ref, g_ref = ref.softmax_loss_grad(X, y, W, K)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    assert loss > 1e3
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)



@pytest.mark.parametrize("k", [1, 2, 3, 10, 11])
@pytest.mark.parametrize(("n", "d"), [(8 * 5 + 3, 37), (16, 128), (7, 5)])
def test_softmax_blocks_match_reference(k: int, n: int, d: int) -> None:
    # The softmax kernels work in eight-row blocks with tiles of two classes: odd k (a class
    # left alone), k = 1, d off the vector width, whole blocks only, and rows after the last
    # block (which go one at a time), for the gradient and for the probabilities.
    rng = np.random.default_rng(100 * k + n)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.float32)
    W = 0.5 * rng.standard_normal((d + 1) * k)
    g = np.full((d + 1) * k, np.nan)
    loss = cpu.softmax_grad(X, y, W, k, g)
    loss_ref, g_ref = ref.softmax_loss_grad(X, y, W, k)
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)
    P = np.full((n, k), np.nan)
    cpu.softmax_predict_proba(X, W, k, P)
    assert_close(P, ref.softmax_predict_proba(X, W, k))

# -------------------------------------------------------------------- predictions


@pytest.mark.parametrize("n", [257, 1, 0])
def test_predictions_match_reference(n: int) -> None:
    X, _, w = _problem("linear", n, seed=8)
    out = np.full(n, np.nan)
    cpu.linear_predict(X, w, out)
    assert_close(out, ref.linear_predict(X, w))

    X, _, w = _problem("logistic", n, seed=9)
    cpu.logistic_predict_proba(X, w, out)
    assert_close(out, ref.logistic_predict_proba(X, w))

    X, _, W = _problem("softmax", n, seed=10)
    out2 = np.full((n, K), np.nan)
    cpu.softmax_predict_proba(X, W, K, out2)
    assert_close(out2, ref.softmax_predict_proba(X, W, K))
    assert_close(out2.sum(axis=1), np.ones(n))

    for kind in ("mlp3", "mlp4"):
        X, _, p = _problem(kind, n, seed=11)
        out2[...] = np.nan
        cpu_mlp.mlp_predict_proba(X, p, _sizes(kind), out2)
        assert_close(out2, ref.mlp_predict_proba(X, p, _sizes(kind)))
        assert_close(out2.sum(axis=1), np.ones(n))


# ------------------------------------------------------------------ mlp layout


def test_mlp_param_count_and_views() -> None:
    assert ref.mlp_param_count((13, 8, 4)) == 13 * 8 + 8 + 8 * 4 + 4
    assert ref.mlp_param_count((13, 8, 6, 4)) == 13 * 8 + 8 + 8 * 6 + 6 + 6 * 4 + 4
    p = np.arange(ref.mlp_param_count((3, 2, 2)), dtype=np.float64)
    (W1, b1), (W2, b2) = ref.mlp_unpack(p, (3, 2, 2))
    np.testing.assert_array_equal(W1, [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(b1, [6, 7])
    np.testing.assert_array_equal(W2, [[8, 9], [10, 11]])
    np.testing.assert_array_equal(b2, [12, 13])
    for a in (W1, b1, W2, b2):
        assert np.shares_memory(a, p)
    W2[1, 0] = -1.0
    assert p[10] == -1.0


# ------------------------------------------------------------------ caller errors


def test_cpu_rejects_wrong_dtype_and_shape() -> None:
    X, y, w = _problem("logistic", 10)
    g = np.empty(D + 1)
    with pytest.raises(TypeError, match="X must have dtype float32"):
        cpu.logistic_grad(X.astype(np.float64), y, w, g)
    with pytest.raises(TypeError, match="w must have dtype float64"):
        cpu.logistic_grad(X, y, w.astype(np.float32), g)
    with pytest.raises(ValueError, match="g_out must have shape"):
        cpu.logistic_grad(X, y, w, np.empty(D))
    with pytest.raises(ValueError, match="y must have shape"):
        cpu.logistic_grad(X, y[:-1].copy(), w, g)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu.linear_grad(np.asfortranarray(X), y, w, g)
    with pytest.raises(ValueError, match="2-D"):
        cpu.linear_grad(X[0], y, w, g)


def test_class_labels_out_of_range_are_rejected() -> None:
    X, y, W = _problem("softmax", 10)
    g = np.empty_like(W)
    for bad in (float(K), -1.0, np.nan):
        yb = y.copy()
        yb[3] = bad
        with pytest.raises(ValueError, match="class labels"):
            cpu.softmax_grad(X, yb, W, K, g)
        with pytest.raises(ValueError):
            ref.softmax_loss_grad(X, yb, W, K)
    _, _, p = _problem("mlp3", 10)
    yb = y.copy()
    yb[0] = K
    with pytest.raises(ValueError, match="class labels"):
        cpu_mlp.mlp_grad(X, yb, p, _sizes("mlp3"), np.empty_like(p))


def test_mlp_rejects_mismatched_sizes() -> None:
    X, y, p = _problem("mlp3", 10)
    with pytest.raises(ValueError, match="sizes"):
        cpu_mlp.mlp_grad(X, y, p, (D + 1, 8, K), np.empty_like(p))
    with pytest.raises(ValueError, match="params must have shape"):
        cpu_mlp.mlp_grad(X, y, p, (D, 9, K), np.empty_like(p))
    with pytest.raises(TypeError):
        ref.mlp_param_count((D, 8.5, K))
    with pytest.raises(ValueError):
        ref.mlp_param_count((D,))


# ------------------------------------------------------- SIMD exp/log1p (logistic)


def test_vmath_exp_and_log1p_are_within_two_ulps_of_libm() -> None:
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.uniform(-40.0, 40.0, 50_000), rng.uniform(-708.0, 708.0, 50_000),
                        rng.uniform(-1e-8, 1e-8, 1000), [0.0, -0.0, 1e-300, 707.9, -707.9]])
    e = np.full_like(x, np.nan)
    vmath.exp_minus_abs(x, e, x.size)
    want = np.exp(-np.abs(x))
    ulp = np.spacing(want)
    assert np.max(np.abs(e - want) / ulp) <= 2.0
    # Beyond |x| = 708 exp would be subnormal: the kernel returns 0 (documented).
    big = np.array([708.5, -709.0, 745.2, 800.0, -1e300])
    out = np.full_like(big, np.nan)
    vmath.exp_minus_abs(big, out, big.size)
    np.testing.assert_array_equal(out, np.zeros_like(big))

    u = np.concatenate([rng.random(50_000), rng.uniform(0.0, 1e-12, 1000), [0.0, 1.0, 1e-300]])
    got = np.array([_log1p_unit(float(v)) for v in u])
    want = np.log1p(u)
    assert np.max(np.abs(got - want) / np.spacing(np.maximum(want, 1e-300))) <= 2.0


def _log1p_unit(v: float) -> float:
    return float(vmath.log1p_unit(v))


@njit(cache=False)
def _exp_log1p32(x: np.ndarray, e: np.ndarray, u: np.ndarray, lg: np.ndarray) -> None:
    for i in range(x.size):
        e[i] = vmath.exp_neg_abs32(x[i])
    for i in range(u.size):
        lg[i] = vmath.log1p_unit32(u[i])


def test_vmath_float32_exp_and_log1p_are_within_two_float32_ulps() -> None:
    rng = np.random.default_rng(14)
    x = np.concatenate([rng.uniform(-20.0, 20.0, 50_000), rng.uniform(-87.0, 87.0, 50_000),
                        rng.uniform(-1e-6, 1e-6, 1000), [0.0, -0.0, 86.9, -86.9]]).astype(np.float32)
    u = np.concatenate([rng.random(50_000), rng.uniform(0.0, 1e-6, 1000), [0.0, 1.0]]).astype(np.float32)
    e, lg = np.full_like(x, np.nan), np.full_like(u, np.nan)
    _exp_log1p32(x, e, u, lg)
    want = np.exp(-np.abs(x.astype(np.float64)))
    assert np.max(np.abs(e - want) / np.spacing(want.astype(np.float32))) <= 2.0
    want = np.log1p(u.astype(np.float64))
    assert np.max(np.abs(lg - want) / np.spacing(np.maximum(want, 1e-37).astype(np.float32))) <= 2.0
    big = np.array([87.5, -90.0, 200.0], np.float32)   # exp subnormal in float32: 0 (documented)
    out = np.full_like(big, np.nan)
    _exp_log1p32(big, out, u[:0], lg[:0])
    np.testing.assert_array_equal(out, np.zeros_like(big))


def test_vmath_float32_logistic_rows_keep_relative_accuracy_where_float32_would_cancel() -> None:
    # Residuals near 0 (confident rows, |z| up to 85: past 87 exp(-|z|) is flushed to 0,
    # documented) and losses next to large z: each within a few float32 ulps of a float64
    # reference written without cancellation.
    rng = np.random.default_rng(15)
    n = 4099
    zr = np.clip(rng.standard_normal(n - 6) * 20, -85.0, 85.0)
    z = np.concatenate([zr, [0.0, 30.0, -30.0, 80.0, -80.0, 1e-8]]).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    r, lrow = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    loss = vmath.logistic_rows32(z, y, r, lrow, n)
    zz, one = z.astype(np.float64), y == 1
    r_ref = np.where(one, -1.0 / (1.0 + np.exp(zz)), 1.0 / (1.0 + np.exp(-zz)))
    l_ref = np.where(one, np.logaddexp(0.0, -zz), np.logaddexp(0.0, zz))
    assert np.max(np.abs(r - r_ref) / np.abs(r_ref)) < 5e-7
    assert np.max(np.abs(lrow - l_ref) / l_ref) < 5e-7
    assert_close(loss, float(np.sum(lrow, dtype=np.float64)), rtol=1e-12)


@pytest.mark.parametrize("scale", [3.0, 60.0, 2000.0])
def test_logistic_matches_reference_across_logit_ranges(scale: float) -> None:
    # Logits up to +-scale*4: the exp argument range of the SIMD exp, its clamp at 708
    # included. 1001 rows: 31 full 32-row blocks and a remainder of 9.
    rng = np.random.default_rng(13)
    n = 1001
    X = rng.standard_normal((n, D)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    w = scale * rng.standard_normal(D + 1) / np.sqrt(D)
    g = np.full(D + 1, np.nan)
    loss = cpu.logistic_grad(X, y, w, g)
    loss_ref, g_ref = ref.logistic_loss_grad(X, y, w)
    assert_close(loss, loss_ref)
    assert_close(g, g_ref)


# ---------------------------------------------------------- MLP float32 compute

# float32 products of O(1) values summed over <= D + 8 terms: ~1e-6 relative per entry.
F32_RTOL = 2e-5


@pytest.mark.parametrize("kind", ["mlp3", "mlp4"])
def test_mlp_float32_compute_matches_reference(kind: str) -> None:
    X, y, p = _problem(kind, 257, seed=14)
    loss_ref, g_ref = ref.mlp_loss_grad(X, y, p, _sizes(kind))
    g = np.full_like(p, np.nan)
    loss = cpu_mlp.mlp_grad(X, y, p, _sizes(kind), g, "float32")
    assert_close(loss, loss_ref, rtol=F32_RTOL)
    assert_close(g, g_ref, rtol=F32_RTOL)
    # float32 really is used: float64 agrees 1e6 times closer.
    g64 = np.empty_like(p)
    cpu_mlp.mlp_grad(X, y, p, _sizes(kind), g64, "float64")
    assert np.max(np.abs(g - g_ref)) > 100 * np.max(np.abs(g64 - g_ref))
    # Repeatable bit for bit on one rank.
    g2 = np.empty_like(p)
    assert cpu_mlp.mlp_grad(X, y, p, _sizes(kind), g2, "float32") == loss
    np.testing.assert_array_equal(g2, g)


def test_mlp_regression_float32_compute_matches_reference() -> None:
    sizes = (D, 8, 1)
    X, _, _ = _problem("linear", 129, seed=15)
    rng = np.random.default_rng(15)
    y = rng.standard_normal(129).astype(np.float32)
    p = 0.5 * rng.standard_normal(ref.mlp_param_count(sizes))
    loss_ref, g_ref = ref.mlp_regression_loss_grad(X, y, p, sizes)
    g = np.full_like(p, np.nan)
    loss = cpu_mlp.mlp_regression_grad(X, y, p, sizes, g, "float32")
    assert_close(loss, loss_ref, rtol=F32_RTOL)
    assert_close(g, g_ref, rtol=F32_RTOL)


def test_mlp_rejects_unknown_compute_dtype() -> None:
    X, y, p = _problem("mlp3", 10)
    for bad in ("float16", "f64x", np.int32, None):
        with pytest.raises(ValueError, match="dtype must be one of float64, float32"):
            cpu_mlp.mlp_grad(X, y, p, _sizes("mlp3"), np.empty_like(p), bad)  # type: ignore[arg-type]


# ------------------------------------------------- linear / logistic float32 compute

_GLM_GRAD = {"linear": cpu.linear_grad, "logistic": cpu.logistic_grad}


@pytest.mark.parametrize("d", [D, 48, 128])   # 48 and 128: the float32 linear's one-pass rows (3 and 8 vectors)
@pytest.mark.parametrize("n", [2, 7, 15, 16, 17, 31, 32, 33, 47])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_float32_compute_matches_reference_at_block_edges(kind: str, n: int, d: int) -> None:
    # float32 logits over d terms and 16-row float32 gradient blocks (row pairs, groups of
    # eight, a remainder); sizes on and around those edges, relative to the gradient's scale.
    rng = np.random.default_rng(200 + n + d)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (rng.standard_normal(n) if kind == "linear" else rng.random(n) < 0.5).astype(np.float32)
    p = 0.5 * rng.standard_normal(d + 1) / np.sqrt(d / D)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    g = np.full_like(p, np.nan)
    loss = _GLM_GRAD[kind](X, y, p, g, "float32")
    scale = float(np.max(np.abs(g_ref)))
    assert scale > 0.0 and loss > 0.0
    assert_close(loss, loss_ref, rtol=F32_RTOL)
    np.testing.assert_allclose(g, g_ref, rtol=F32_RTOL, atol=F32_RTOL * scale)
    # Repeatable bit for bit, and a separate path from the float64 kernel's.
    g2 = np.empty_like(p)
    assert _GLM_GRAD[kind](X, y, p, g2, "float32") == loss
    np.testing.assert_array_equal(g2, g)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_float32_compute_really_rounds_in_float32(kind: str) -> None:
    # 3 chunks of 1536 rows at d = 128: float32 products miss the float64 reference by
    # ~1e-7 relative, the float64 kernel by ~1e-15; both agree within F32_RTOL.
    rng = np.random.default_rng(16)
    n, d = 1536, 128
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (rng.standard_normal(n) if kind == "linear" else rng.random(n) < 0.5).astype(np.float32)
    p = 0.1 * rng.standard_normal(d + 1)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    g32, g64 = np.empty_like(p), np.empty_like(p)
    loss32 = _GLM_GRAD[kind](X, y, p, g32, "float32")
    _GLM_GRAD[kind](X, y, p, g64, "float64")
    scale = float(np.max(np.abs(g_ref)))
    assert_close(loss32, loss_ref, rtol=F32_RTOL)
    np.testing.assert_allclose(g32, g_ref, rtol=F32_RTOL, atol=F32_RTOL * scale)
    assert np.max(np.abs(g32 - g_ref)) > 100 * np.max(np.abs(g64 - g_ref))


@pytest.mark.parametrize("pf", [False, True])
@pytest.mark.parametrize("blk", [16, 32])
@pytest.mark.parametrize("n", [7, 15, 16, 17, 31, 32, 33, 47, 64, 65])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_chunks_match_reference_for_either_block(kind: str, n: int, blk: int, pf: bool) -> None:
    # Drive the raw chunk kernels through other block sizes than _BLOCK, with and without
    # the prefetch (which the small X of the other tests never turn on), float64 and
    # float32 compute, on and around the block edges.
    X, y, p = _problem(kind, n, seed=300 + n)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    logistic = kind == "logistic"
    g = np.full_like(p, np.nan)
    assert_close(cpu_glm._glm_chunk(X, y, p, 0, n, g, logistic, blk, pf), loss_ref)
    assert_close(g, g_ref)
    g32 = np.full_like(p, np.nan)
    loss32 = cpu_glm._glm32_chunk(X, y, p[:D].astype(np.float32), float(p[D]), 0, n, g32, logistic, blk, pf)
    assert_close(loss32, loss_ref, rtol=F32_RTOL)
    np.testing.assert_allclose(g32, g_ref, rtol=F32_RTOL, atol=F32_RTOL * float(np.max(np.abs(g_ref))))


@pytest.mark.parametrize(("n", "pf"), [(2048, False), (2049, True)])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_prefetch_follows_the_size_of_x(kind: str, n: int, pf: bool) -> None:
    # 2048 x 128 float32 is 1 MiB (fits one Zen 4 core's L2): no prefetch; a row more: the
    # kernels prefetch rows ahead, up to and past the last row (clipped). A prefetch is a
    # hint: the float64 chunk gives the same bits either way. The float32 chunk also picks
    # its logit pass by X's size (eight rows a pass in L2, two from DRAM): both agree with
    # the reference.
    rng = np.random.default_rng(17)
    X = rng.standard_normal((n, 128)).astype(np.float32)
    assert cpu_glm._prefetches(X) == pf
    y = (rng.standard_normal(n) if kind == "linear" else rng.random(n) < 0.5).astype(np.float32)
    p = 0.1 * rng.standard_normal(129)
    loss_ref, g_ref = _ref_loss_grad(kind, X, y, p)
    logistic = kind == "logistic"
    for compute in ("float64", "float32"):
        g = np.empty_like(p)
        loss = cpu.logistic_grad(X, y, p, g, compute) if logistic else cpu.linear_grad(X, y, p, g, compute)
        rtol = F32_RTOL if compute == "float32" else 1e-9
        assert_close(loss, loss_ref, rtol=rtol)
        np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * float(np.max(np.abs(g_ref))))
    g_on, g_off = np.empty_like(p), np.empty_like(p)
    l_on = cpu_glm._glm_chunk(X, y, p, 0, n, g_on, logistic, cpu_glm._BLOCK, True)
    l_off = cpu_glm._glm_chunk(X, y, p, 0, n, g_off, logistic, cpu_glm._BLOCK, False)
    assert l_on == l_off
    assert np.array_equal(g_on, g_off)
    w32, b = p[:128].astype(np.float32), float(p[128])
    for flag in (True, False):
        g32 = np.empty_like(p)
        l32 = cpu_glm._glm32_chunk(X, y, w32, b, 0, n, g32, logistic, cpu_glm._BLOCK, flag)
        assert_close(l32, loss_ref, rtol=F32_RTOL)
        np.testing.assert_allclose(g32, g_ref, rtol=F32_RTOL, atol=F32_RTOL * float(np.max(np.abs(g_ref))))


@pytest.mark.parametrize(("n", "d"), [(2700, 100), (1100, 257), (16500, 17)])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_glm_with_prefetch_matches_reference_for_other_widths(kind: str, n: int, d: int) -> None:
    # X just over 1 MiB (the kernels prefetch) with d off the 16- and 128-column vector
    # tiles: the scalar column tails, both precisions, against the float64 reference.
    rng = np.random.default_rng(n + d)
    X = rng.standard_normal((n, d)).astype(np.float32)
    assert cpu_glm._prefetches(X)
    y = (rng.standard_normal(n) if kind == "linear" else rng.random(n) < 0.5).astype(np.float32)
    p = rng.standard_normal(d + 1) / np.sqrt(d)
    loss_ref, g_ref = (ref.linear_loss_grad if kind == "linear" else ref.logistic_loss_grad)(X, y, p)
    for compute, rtol in (("float64", 1e-9), ("float32", F32_RTOL)):
        g = np.full_like(p, np.nan)
        loss = (cpu.linear_grad if kind == "linear" else cpu.logistic_grad)(X, y, p, g, compute)
        assert_close(loss, loss_ref, rtol=rtol)
        np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * float(np.max(np.abs(g_ref))))


def test_glm_rejects_unknown_compute() -> None:
    X, y, p = _problem("logistic", 10)
    for bad in ("float16", "f32", None):
        with pytest.raises(ValueError, match="compute must be one of float64, float32"):
            cpu.logistic_grad(X, y, p, np.empty_like(p), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [2, 3, 10])
def test_label_check_refuses_what_the_kernels_would_index_out_of_range(k: int) -> None:
    # models.base.check_labels on a float32 batch: one numba pass; against numpy's
    # definition on random labels with bad ones planted (below 0, k or more, NaN).
    from fleetmpi.models import build_model
    from fleetmpi.spec import ModelSpec
    rng = np.random.default_rng(k)
    model = build_model(ModelSpec(kind="softmax"), 4, k)
    for trial in range(200):
        y = rng.integers(0, k, int(rng.integers(1, 300))).astype(np.float32)
        if trial % 2:
            y[int(rng.integers(y.size))] = [-1.0, float(k), k + 0.5, -0.25, np.nan][trial % 5]
        bad = bool(np.isnan(y).any() or (y < 0).any() or (y >= k).any())
        assert cpu.labels_within(y, k) is not bad, y
        if bad:
            with pytest.raises(ValueError, match=f"class ids in 0..{k - 1}"):
                model.check_labels(y, k)
        else:
            model.check_labels(y, k)
    model.check_labels(np.array([0, k - 1], np.float64), k)   # other dtypes: numpy's check
    with pytest.raises(ValueError):
        model.check_labels(np.array([0, k], np.float64), k)
