"""kernels.gpu against kernels.reference / kernels.compress / optim.SGD on random data.

Runs wherever numba sees a CUDA device: under numba's CUDA simulator (tests/gpu/test_gpu_kernels.py
runs this folder in a subprocess with NUMBA_ENABLE_CUDASIM=1, so `make test` always runs it)
and on a real GPU. Sizes stay small: the simulator runs every CUDA thread as a Python thread.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from fleetmpi.optim import SGD
from fleetmpi.spec import OptimizerSpec
from kernels import compress, gpu
from kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not cuda.is_available(),
    reason="no CUDA GPU visible (numba.cuda.is_available() is False without the simulator); "
           "tests/gpu/test_gpu_kernels.py runs this module with NUMBA_ENABLE_CUDASIM=1")

K = 4
# Float64 sums of float32 * float64 products in another order than the reference's BLAS:
# they agree to a few ulps times log(n).
RTOL = 1e-11


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _problem(kind: str, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return random (X, y, params): no zeros, labels of the kind's sort."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    if kind == "linear":
        return X, rng.standard_normal(n).astype(np.float32), 0.5 * rng.standard_normal(d + 1)
    if kind == "logistic":
        return X, (rng.random(n) < 0.5).astype(np.float32), 0.5 * rng.standard_normal(d + 1)
    return X, rng.integers(0, K, n).astype(np.float32), 0.5 * rng.standard_normal((d + 1) * K)


def _reference(kind: str, X: np.ndarray, y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    if kind == "linear":
        return ref.linear_loss_grad(X, y, p)
    if kind == "logistic":
        return ref.logistic_loss_grad(X, y, p)
    return ref.softmax_loss_grad(X, y, p, K)


def _gpu(kind: str, X: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Return the device kernel's output [gradient sum | loss sum] on the host; out starts as NaN garbage."""
    dX, dy, dp = cuda.to_device(X), cuda.to_device(y), cuda.to_device(p)
    out = cuda.to_device(np.full(p.size + 1, np.nan))
    if kind == "linear":
        gpu.linear_grad(dX, dy, dp, out)
    elif kind == "logistic":
        gpu.logistic_grad(dX, dy, dp, out)
    else:
        gpu.softmax_grad(dX, dy, dp, K, out)
    return out.copy_to_host()


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize(("n", "d"), [(300, 13), (37, 40), (1, 5)])
@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
def test_gradient_matches_reference(kind: str, n: int, d: int) -> None:
    # 300 rows: 3 blocks, the last one partial; d=40: two column tiles of shared memory.
    X, y, p = _problem(kind, n, d)
    out = _gpu(kind, X, y, p)
    loss, g = _reference(kind, X, y, p)
    assert_close(out[:-1], g)
    assert_close(out[-1:], np.array([loss]))
    assert np.abs(g).max() > 0.01   # a real gradient, not one that happens to be ~0


@pytest.mark.parametrize("kind", ["logistic", "softmax"])
def test_blocks_that_loop_over_several_tiles_match(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With at most 2 blocks, 300 rows give each block two tiles of 128 rows (chunk 256).
    monkeypatch.setattr(gpu, "MAX_BLOCKS", 2)
    assert gpu.n_blocks(300) == 2
    X, y, p = _problem(kind, 300, 9, seed=4)
    out = _gpu(kind, X, y, p)
    loss, g = _reference(kind, X, y, p)
    assert_close(out[:-1], g)
    assert_close(out[-1:], np.array([loss]))


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
def test_gradient_is_deterministic(kind: str) -> None:
    X, y, p = _problem(kind, 200, 7, seed=2)
    assert np.array_equal(_gpu(kind, X, y, p), _gpu(kind, X, y, p))


@pytest.mark.parametrize("d", [6, 200])
@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
def test_empty_batch_gives_zeros(kind: str, d: int) -> None:
    # A rank with no rows this step (batch < ranks) still sends zeros; d=200: more outputs
    # than one block of threads, every one of them overwritten.
    X, y, p = _problem(kind, 0, d)
    assert np.array_equal(_gpu(kind, X, y, p), np.zeros(p.size + 1))


def test_logistic_matches_finite_differences() -> None:
    X, y, p = _problem("logistic", 60, 5, seed=7)
    out = _gpu("logistic", X, y, p)
    h = 1e-6
    fd = np.empty_like(p)
    for i in range(p.size):
        q = p.copy()
        q[i] += h
        up = _gpu("logistic", X, y, q)[-1]
        q[i] -= 2 * h
        fd[i] = (up - _gpu("logistic", X, y, q)[-1]) / (2 * h)
    assert_close(fd, out[:-1], rtol=1e-6)


def test_logistic_is_finite_for_huge_logits() -> None:
    X, y, p = _problem("logistic", 50, 4, seed=3)
    p = p * 1e4
    out = _gpu("logistic", X, y, p)
    loss, g = ref.logistic_loss_grad(X, y, p)
    assert np.all(np.isfinite(out))
    assert_close(out[:-1], g)
    assert_close(out[-1:], np.array([loss]))


def test_kernels_reject_host_arrays_and_wrong_shapes() -> None:
    X, y, p = _problem("logistic", 10, 3)
    out = cuda.device_array(p.size + 1)
    with pytest.raises(TypeError, match="X must be a 2-D device array"):
        gpu.logistic_grad(X, cuda.to_device(y), cuda.to_device(p), out)
    with pytest.raises(ValueError, match="w must have shape"):
        gpu.logistic_grad(cuda.to_device(X), cuda.to_device(y), cuda.to_device(p[:-1]), out)
    with pytest.raises(TypeError, match="y must have dtype float32"):
        gpu.logistic_grad(cuda.to_device(X), cuda.to_device(y.astype(np.float64)), cuda.to_device(p), out)
    with pytest.raises(ValueError, match="out must have shape"):
        gpu.logistic_grad(cuda.to_device(X), cuda.to_device(y), cuda.to_device(p), cuda.device_array(p.size))


# ------------------------------------------------------------------ threshold encode / decode


def _residual_and_grad(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), 2.0 * rng.standard_normal(n)


@pytest.mark.parametrize("n", [300, 11])
def test_encode_matches_cpu_bit_for_bit(n: int) -> None:
    res, g = _residual_and_grad(n, 1)
    tau = 1.5
    cres, cout = res.copy(), np.empty(n, np.uint32)
    m_cpu = compress.encode(cres, g, tau, cout)
    dres, dout = cuda.to_device(res), cuda.device_array(n, np.uint32)
    m = gpu.encode(dres, cuda.to_device(g), tau, dout)
    assert 0 < m == m_cpu < n
    assert np.array_equal(dout.copy_to_host()[:m], cout[:m])      # same entries, same (index) order
    assert np.array_equal(dres.copy_to_host(), cres)
    assert (dout.copy_to_host()[:m] & compress.SIGN_BIT).any()     # both signs occur


def test_encode_reuses_scratch_and_sends_nothing_below_tau() -> None:
    res, g = _residual_and_grad(200, 2)
    dres = cuda.to_device(res)
    scratch = gpu.encode_scratch(200)
    out = cuda.device_array(200, np.uint32)
    m1 = gpu.encode(dres, cuda.to_device(g), 2.0, out, scratch=scratch)
    m2 = gpu.encode(dres, cuda.to_device(np.zeros(200)), 1e9, out, scratch=scratch)
    assert m1 > 0 and m2 == 0


def test_decode_of_several_ranks_blocks_matches_cpu() -> None:
    # Three "ranks" send overlapping index sets: counts up to 3 per index, both signs.
    n, tau = 150, 0.75
    blocks = []
    for seed in range(3):
        res, g = _residual_and_grad(n, 10 + seed)
        out = np.empty(n, np.uint32)
        blocks.append(out[:compress.encode(res, g, tau, out)])
    packed = np.concatenate(blocks)
    want = np.empty(n)
    compress.decode(packed, tau, want)
    got = cuda.device_array(n)
    gpu.decode(cuda.to_device(packed), packed.size, tau, got)
    # count * tau rounds once where the sequential sum may round per entry: <= 1 ulp apart.
    np.testing.assert_allclose(got.copy_to_host(), want, rtol=2.3e-16, atol=0)
    assert np.abs(want).max() >= 2 * tau


def test_decode_rejects_an_index_out_of_range() -> None:
    packed = cuda.to_device(np.array([1, 7], np.uint32))
    with pytest.raises(ValueError, match="index >= 5"):
        gpu.decode(packed, 2, 1.0, cuda.device_array(5))
    # With reused scratch the flag is reset per call: a good buffer after a bad one decodes.
    counts, bad, g = cuda.to_device(np.zeros(5, np.int32)), cuda.to_device(np.zeros(1, np.int32)), cuda.device_array(5)
    with pytest.raises(ValueError, match="index >= 5"):
        gpu.decode(packed, 2, 1.0, g, counts, 0, bad)
    counts = cuda.to_device(np.zeros(5, np.int32))   # the failed call left counts[1] set
    gpu.decode(cuda.to_device(np.array([1, 3 | 0x80000000, 3], np.uint32)), 3, 0.5, g, counts, 0, bad)
    np.testing.assert_array_equal(g.copy_to_host(), [0.0, 0.5, 0.0, 0.0, 0.0])


# ------------------------------------------------------------------ optimizer update


@pytest.mark.parametrize(("momentum", "l2"), [(0.9, 1e-3), (0.0, 1e-3), (0.9, 0.0), (0.0, 0.0)])
def test_sgd_update_rounds_like_the_host_step(momentum: float, l2: float) -> None:
    rng = np.random.default_rng(5)
    n, B, lr = 257, 50, 0.37
    params, vel, g = rng.standard_normal(n), rng.standard_normal(n), 40 * rng.standard_normal(n)
    mask = (rng.random(n) < 0.9).astype(np.float64)
    # The host path, exactly as Trainer.sgd_step and SGD.step do it.
    want_p = params.copy()
    sgd = SGD(OptimizerSpec(lr=lr, momentum=momentum, batch=B), n)
    sgd.velocity[:] = vel
    grad = g / B
    if l2:
        grad += l2 * mask * want_p
    sgd.step(want_p, grad, step=0)
    dp, dv = cuda.to_device(params), cuda.to_device(vel)
    gpu.sgd_update(dp, dv, cuda.to_device(g), cuda.to_device(mask), B, l2, lr, momentum)
    assert np.array_equal(dp.copy_to_host(), want_p)
    assert np.array_equal(dv.copy_to_host(), sgd.velocity if momentum else vel)
