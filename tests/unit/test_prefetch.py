"""kernels.prefetch: the intrinsics compile, emit a prefetch and change no result."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from kernels.prefetch import prefetch, prefetch_l2


@njit(cache=False)
def _sum_rows(X: np.ndarray, ahead: int, level: int) -> float:
    """Sum X row by row, prefetching the row ``ahead`` rows on (clamped) at ``level``."""
    n, d = X.shape
    s = 0.0
    for i in range(n):
        r = min(i + ahead, n - 1)
        for j in range(0, d, 16):
            if level == 1:
                prefetch(X, r * d + j)
            elif level == 2:
                prefetch_l2(X, r * d + j)
        for j in range(d):
            s += X[i, j]
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetch_is_a_no_op_for_results(dtype: type) -> None:
    X = np.random.default_rng(5).standard_normal((257, 40)).astype(dtype)
    want = _sum_rows(X, 0, 0)
    assert want == pytest.approx(float(X.astype(np.float64).sum()), rel=1e-12, abs=1e-9)
    for ahead in (1, 8, 300):
        assert _sum_rows(X, ahead, 1) == want
        assert _sum_rows(X, ahead, 2) == want


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 mnemonics")
def test_prefetch_emits_the_instructions() -> None:
    X = np.zeros((4, 32), dtype=np.float32)
    _sum_rows(X, 1, 1)
    asm = _sum_rows.inspect_asm(_sum_rows.signatures[0])
    assert "prefetcht0" in asm     # locality 3: into L1
    assert "prefetcht1" in asm     # locality 2: into L2


def test_prefetch_rejects_non_arrays() -> None:
    @njit(cache=False)
    def bad(x: float) -> None:
        prefetch(x, 0)

    with pytest.raises(TypingError):
        bad(1.0)
