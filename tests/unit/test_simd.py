"""kernels.simd: the explicit-SIMD loops against float64 references, on and off the vector edges."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from kernels import simd

# d around the vector (16) and tile (128) widths: a scalar tail only, one vector, a
# vector and a tail, one tile, a tile and a vector and a tail, two tiles and a tail.
DIMS = [5, 16, 20, 128, 150, 257]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("m", [0, 1, 7, 8, 33])
def test_add_rows_matches_reference(d: int, m: int, dtype: type) -> None:
    rng = np.random.default_rng(100 * d + m)
    X = rng.standard_normal((m + 12, d)).astype(np.float32)
    r = rng.standard_normal(m + 12).astype(dtype)
    g0 = rng.standard_normal(d + 1).astype(dtype)
    g = g0.copy()
    simd.add_rows(g, X, 3, r, 2, m)
    ref = g0[:d].astype(np.float64) + X[3:3 + m].astype(np.float64).T @ r[2:2 + m].astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(g[:d], ref, rtol=tol, atol=tol * float(np.max(np.abs(ref))))
    assert g[d] == g0[d]   # past d: untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", DIMS)
def test_add_rows_in_pieces_gives_the_same_bits(d: int, dtype: type) -> None:
    # Rows are added in order, one FMA each, so 8 rows a call (the kernels' DRAM path)
    # and one call for all rows (their L2 path) give identical g.
    rng = np.random.default_rng(d)
    X = rng.standard_normal((40, d)).astype(np.float32)
    r = rng.standard_normal(40).astype(dtype)
    whole = np.zeros(d, dtype)
    simd.add_rows(whole, X, 0, r, 0, 37)
    pieces = np.zeros(d, dtype)
    for t in range(0, 37, 8):
        simd.add_rows(pieces, X, t, r, t, min(8, 37 - t))
    assert np.array_equal(whole, pieces)


@pytest.mark.parametrize("d", DIMS)
def test_dot_rows8_matches_reference(d: int) -> None:
    rng = np.random.default_rng(7 + d)
    X = rng.standard_normal((12, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    out = np.full(12, -7.0, np.float32)
    simd.dot_rows8(X, 2, w, out, 3)
    ref = X[2:10].astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(out[3:11], ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))
    assert out[0] == -7.0 and out[11] == -7.0   # only out[3:11] written


# d for linear_rows: one vector, three (an odd count: the two FMA chains differ in
# length), eight (a whole tile); 20 and 144 do not fit (nothing is done: before the IR
# switched on d itself, d = 20 ran as one vector and dropped its last 4 columns).
ROW_DIMS = [16, 48, 128]


def _rows_case(d: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((50, d)).astype(np.float32)
    w = (scale * rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    y = (rng.random(50) < 0.5).astype(np.float32)
    return X, w, y


@pytest.mark.parametrize("d", ROW_DIMS)
def test_linear_rows_matches_reference(d: int) -> None:
    X, w, y = _rows_case(d, 1.0, d)
    y = y + np.float32(0.25)
    g = np.full(d + 1, np.nan, np.float32)
    acc = np.array([1.5, -2.0])
    simd.linear_rows(g, X, 3, 33, w, y, 0.3, acc)
    rows = X[3:36].astype(np.float64)
    r = rows @ w.astype(np.float64) + 0.3 - y[3:36]
    ref = rows.T @ r
    np.testing.assert_allclose(g[:d], ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))
    assert np.isnan(g[d])   # past d: untouched
    np.testing.assert_allclose(acc, [1.5 + 0.5 * float(r @ r), -2.0 + float(r.sum())], rtol=1e-5)


@pytest.mark.parametrize("d", [20, 144])
def test_rows_that_do_not_fit_are_left_alone(d: int) -> None:
    assert not simd.linear_rows_fit(d)
    X, w, y = _rows_case(d, 1.0, d)
    g = np.full(d, np.nan, np.float32)
    acc = np.zeros(2)
    simd.linear_rows(g, X, 0, 8, w, y, 0.0, acc)
    assert np.isnan(g).all() and not acc.any()


@njit(cache=False)
def _shift_scale(Z: np.ndarray, D: np.ndarray, E: np.ndarray, s: np.ndarray) -> None:
    simd.softmax8_shift(Z, D)
    simd.softmax8_scale(E, Z, s)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 11])
def test_softmax8_shift_and_scale_give_the_scalar_loops_bits(k: int) -> None:
    # D = z - (max over classes), s = sum over classes in class order, z = e * (1 / s):
    # each lane as a scalar loop over classes computes it, bit for bit.
    rng = np.random.default_rng(k)
    Z = 4.0 * rng.standard_normal((k, 8))
    E = rng.random(k * 8) + 1e-3
    D, s = np.full(k * 8, np.nan), np.full(8, np.nan)
    Z_in = Z.copy()
    _shift_scale(Z, D, E, s)
    m = Z_in[0].copy()
    for c in range(1, k):
        m = np.where(Z_in[c] > m, Z_in[c], m)
    assert np.array_equal(D, (Z_in - m).ravel())
    want_s = E[:8].copy()
    for c in range(1, k):
        want_s = want_s + E[c * 8:(c + 1) * 8]
    assert np.array_equal(s, want_s)
    assert np.array_equal(Z, E.reshape(k, 8) * (1.0 / want_s))
