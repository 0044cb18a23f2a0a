"""The bench's roofline arithmetic (bench/bench_kernels.py): the bound its of_bound uses."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
_env = dict(os.environ)
bk = importlib.import_module("bench_kernels")

# The bench pins BLAS threads in os.environ on import; keep this process's as it was.
os.environ.clear()
os.environ.update(_env)


def test_flops_per_byte_counts_two_fmas_per_element() -> None:
    # Linear / logistic: logit FMA + gradient FMA = 4 FLOPs per 4-byte element.
    assert bk.flops_per_byte("linear") == 1.0
    assert bk.flops_per_byte("logistic f32") == 1.0
    assert bk.flops_per_byte("softmax k=10", k=10) == 10.0


@pytest.mark.parametrize(("read", "peak", "fpb", "want"), [
    (97.0, 52.6, 1.0, 52.6),     # L2, float64: compute-bound, 0.85 of the read impossible
    (97.0, 96.2, 1.0, 96.2),     # L2, float32: compute-bound just below the read
    (33.0, 52.6, 1.0, 33.0),     # DRAM: read-bound
    (33.0, 52.6, 10.0, 5.26),    # softmax k=10: compute-bound even from DRAM
])
def test_attainable_is_the_roofline_min(read: float, peak: float, fpb: float, want: float) -> None:
    assert bk.attainable_GBps(read, peak, fpb) == pytest.approx(want)


def test_085_of_the_l2_read_is_beyond_float64_fma_peak() -> None:
    # The target at L2 size, 0.85 x 97 GB/s, needs 82 GFLOP/s at 1 FLOP/byte:
    # above the float64 peak (52.6), within the float32 one (96.2).
    need = 0.85 * 97.0 * bk.flops_per_byte("logistic")
    assert 52.6 < need < 96.2
