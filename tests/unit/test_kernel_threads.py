"""Test that the threaded gradient kernels give bit-identical results at 1 and 2 threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import cpu
from kernels import reference as ref

# numba fixes its thread pool size at import, so the comparison runs in a child process
# started with NUMBA_NUM_THREADS=2 that switches between 1 and 2 threads.
_CHILD = r"""
import sys
import numba
import numpy as np
from kernels import cpu
n, d, k = int(sys.argv[1]), int(sys.argv[3]), 5
rng = np.random.default_rng(7)
X = rng.standard_normal((n, d)).astype(np.float32)
yb = (rng.random(n) < 0.5).astype(np.float32)
yk = rng.integers(0, k, n).astype(np.float32)
w = 0.5 * rng.standard_normal(d + 1)
W = 0.5 * rng.standard_normal((d + 1) * k)
out = []
for threads in (1, 2):
    numba.set_num_threads(threads)
    g, G = np.empty(d + 1), np.empty((d + 1) * k)
    row = [cpu.linear_grad(X, yb, w, g), g.copy(), cpu.logistic_grad(X, yb, w, g), g.copy(),
           cpu.softmax_grad(X, yk, W, k, G), G.copy()]
    for compute in ("float64", "float32"):   # float32 compute (kernels.cpu_glm): same chunks
        row += [cpu.linear_grad(X, yb, w, g, compute), g.copy(), cpu.logistic_grad(X, yb, w, g, compute), g.copy()]
    out.append(np.concatenate([np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in row]))
np.save(sys.argv[2], np.stack(out))
"""


# 8000 x 37: over 1 MiB, so the kernels prefetch; d = 64: the float32 linear's one-pass rows
# (simd.linear_rows), at 3001 x 64 under 1 MiB and 5000 x 64 over it.
@pytest.mark.parametrize(("n", "d"), [(5003, 37), (1100, 37), (8000, 37), (3001, 64), (5000, 64)])
def test_one_and_two_threads_are_bitwise_equal(tmp_path: Path, n: int, d: int) -> None:
    out = tmp_path / "g.npy"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", _CHILD, str(n), str(out), str(d)], env=env, check=True, timeout=600)
    one, two = np.load(out)
    assert np.all(np.isfinite(one)) and np.all(one != 0.0)
    assert one.tobytes() == two.tobytes()
    # The float32 rows differ from the float64 ones (another kernel ran), within float32 rounding.
    f64, f32 = np.split(one[-4 * (d + 1) - 4:], 2)   # per compute: 2 x (loss, d + 1 gradient)
    assert not np.array_equal(f64, f32)
    np.testing.assert_allclose(f32, f64, rtol=1e-4, atol=1e-4 * np.abs(f64).max())


@pytest.mark.parametrize("n", [16 * 512 + 13, 3 * 512 + 7, 8 * 3 + 5])
def test_chunked_kernels_match_reference(n: int) -> None:
    # n spans several row chunks, eight-row blocks and a remainder of rows.
    rng = np.random.default_rng(n)
    d, k = 21, 7
    X = rng.standard_normal((n, d)).astype(np.float32)
    yr = rng.standard_normal(n).astype(np.float32)
    yb = (rng.random(n) < 0.5).astype(np.float32)
    yk = rng.integers(0, k, n).astype(np.float32)
    w = 0.5 * rng.standard_normal(d + 1)
    W = 0.5 * rng.standard_normal((d + 1) * k)
    g, G = np.full(d + 1, np.nan), np.full((d + 1) * k, np.nan)
    for got, (loss_ref, g_ref) in (
        ((cpu.linear_grad(X, yr, w, g), g.copy()), ref.linear_loss_grad(X, yr, w)),
        ((cpu.logistic_grad(X, yb, w, g), g.copy()), ref.logistic_loss_grad(X, yb, w)),
        ((cpu.softmax_grad(X, yk, W, k, G), G.copy()), ref.softmax_loss_grad(X, yk, W, k)),
    ):
        scale = float(np.max(np.abs(g_ref)))
        np.testing.assert_allclose(got[0], loss_ref, rtol=1e-11)
        np.testing.assert_allclose(got[1], g_ref, rtol=1e-11, atol=1e-11 * scale)
