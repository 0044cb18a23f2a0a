"""Cache-line-aligned row buffers (kernels.memory): where X starts changes speed, never results."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.engine.data import RankReader
from kernels import cpu
from kernels.memory import ALIGN, aligned_empty


@pytest.mark.parametrize("shape,dtype", [((0, 128), np.float32), ((5, 7), np.float32), (13, np.float64),
                                         ((3, 4, 5), np.int32), ((1000, 128), np.float32)])
def test_aligned_empty_starts_on_a_line(shape: tuple, dtype: type) -> None:
    a = aligned_empty(shape, dtype)
    assert a.size == 0 or a.ctypes.data % ALIGN == 0   # an empty array has no data to place
    assert a.shape == ((shape,) if isinstance(shape, int) else shape) and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    a[...] = 3   # the whole buffer is ours to write
    assert (a == 3).all()
    if a.ndim and a.shape[0] > 1:
        assert a[:1].ctypes.data % ALIGN == 0


def test_aligned_empty_other_boundary_and_bad_align() -> None:
    assert aligned_empty((9, 3), np.float32, align=4096).ctypes.data % 4096 == 0
    with pytest.raises(ValueError, match="power of two"):
        aligned_empty(4, np.float32, align=48)


def _at_offset(X: np.ndarray, off: int) -> np.ndarray:
    """Return a C-contiguous copy of X whose data start ``off`` bytes past a 64-byte boundary."""
    raw = aligned_empty(X.nbytes + ALIGN, np.uint8)
    out = raw[off:off + X.nbytes].view(X.dtype).reshape(X.shape)
    out[...] = X
    assert out.ctypes.data % ALIGN == off
    return out


# 1000 x 128 float32 (512 KB) runs the in-L2 path (dot_rows8); 2600 x 128 (1.3 MB) the
# prefetching path; d = 20 leaves scalar tails and rows that start off a line anyway.
@pytest.mark.parametrize("n,d", [(1000, 128), (2600, 128), (777, 20)])
def test_kernels_give_the_same_bits_wherever_x_starts(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    X = rng.standard_normal((n, d), dtype=np.float32)
    yb = (rng.random(n) < 0.4).astype(np.float32)
    yk = rng.integers(0, 7, n).astype(np.float32)
    w = 0.2 * rng.standard_normal(d + 1)
    W = 0.2 * rng.standard_normal((d + 1) * 7)

    def run(Xo: np.ndarray) -> list[np.ndarray]:
        out = []
        for fn in (cpu.linear_grad, cpu.logistic_grad):
            for compute in cpu.GLM_COMPUTE:
                g = np.empty(d + 1)
                loss = fn(Xo, yb, w, g, compute)
                out += [g, np.array([loss])]
        G = np.empty((d + 1) * 7)
        out += [G, np.array([cpu.softmax_grad(Xo, yk, W, 7, G)])]
        return out

    base = run(_at_offset(X, 0))
    # the logistic float32 gradient against the float64 kernel: the runs compute something real
    np.testing.assert_allclose(base[6], base[4], rtol=1e-4, atol=1e-3 * np.abs(base[4]).max())
    for off in (4, 16, 36):
        for a, b in zip(base, run(_at_offset(X, off)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_reader_buffers_are_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 32)).astype(np.float32)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = X, rng.integers(0, 2, 300)
    for direct in (True, False):
        reader = RankReader(path, direct)
        xb, _, _ = reader.read([(10, 50), (200, 260)])
        np.testing.assert_array_equal(xb, np.concatenate([X[10:50], X[200:260]]))
        xc, _ = reader.read_contiguous(5, 77)
        np.testing.assert_array_equal(xc, X[5:77])
        assert xb.ctypes.data % ALIGN == 0 and xc.ctypes.data % ALIGN == 0
        reader.close()
