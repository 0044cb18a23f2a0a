"""GPU tree histograms (kernels.gpu_trees) against the CPU kernel (kernels.trees.build_root) on the same rows.

The root histogram of n x 32 uint8 codes with int64 (g, h), at 1M and 4M rows, for 255
bins a feature (8160 bins: the shared kernel runs 3 feature groups, "auto" takes the
global kernel) and 64 bins (2048 bins: one shared group, "auto" takes the shared
kernel). GPU: CUDA events around one launch (zeroing included, no host copy, no flag
check), best of bench_gpu.REPEAT; CPU: kernels.trees.build_root on one thread (numba, as one rank
runs it), best of CPU_REPEAT, measured in the same run. Each GPU result is compared with
the CPU's bit for bit once.

Needs a real GPU. Under numba's CUDA simulator, or where numba sees no GPU, it prints
"no GPU: skipped" and exits 0: simulated timings would be fiction.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import REPEAT, _time_ms  # CUDA-event best-of timing, as the other GPU benchmark times
from common import best_of, save, table

CPU_REPEAT = 3
SIZES = (1 << 20, 4 << 20)
D = 32
BINS = (255, 64)
METHODS = ("shared", "global")


def problem(n: int, d: int, bins: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (codes (n, d) uint8, gh (n, 2) int64, foff): every feature with ``bins`` bins, uniform codes."""
    from kernels import trees as T
    rng = np.random.default_rng(seed)
    foff = T.feature_offsets(np.full(d, bins - 1, np.int32))
    codes = rng.integers(0, bins, (n, d), dtype=np.uint8)
    gh = rng.integers(-(2**40), 2**40, (n, 2), dtype=np.int64)
    return codes, gh, foff


def rows() -> list[dict[str, Any]]:
    from numba import cuda

    from kernels import gpu_trees
    from kernels import trees as T
    stream = cuda.stream()
    out = []
    for n in SIZES:
        for bins in BINS:
            codes, gh, foff = problem(n, D, bins)
            want = T.build_root(codes, gh, foff)          # compiles (or loads) the CPU kernel first
            buf = np.empty_like(want)
            cpu_ms = 1e3 * best_of(lambda: T.build_root(codes, gh, foff, buf), CPU_REPEAT)
            layout = gpu_trees.Layout(foff, stream)
            dcodes, dgh = cuda.to_device(codes, stream=stream), cuda.to_device(gh, stream=stream)
            dout = cuda.device_array(want.shape, np.int64, stream=stream)
            for method in METHODS:
                def launch(method: str = method) -> None:
                    gpu_trees.build_root(dcodes, dgh, layout, dout, method, False, stream)
                ms = _time_ms(launch, stream)
                gpu_trees.build_root(dcodes, dgh, layout, dout, method, True, stream)   # flag checked
                equal = bool(np.array_equal(dout.copy_to_host(stream=stream), want))
                out.append({"rows": n, "d": D, "bins": bins, "groups": len(layout.groups) - 1, "method": method,
                            "auto": layout.method("auto") == method, "gpu_ms": ms, "cpu_ms": cpu_ms,
                            "speedup": cpu_ms / ms, "equal": equal})
    return out


def main() -> int:
    from fleetmpi.engine.device import gpu_visible, simulated
    if simulated() or not gpu_visible():
        print("no GPU: skipped")
        return 0
    from numba import cuda
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else str(name)
    t0 = time.perf_counter()
    result = rows()
    print(table(f"Root histogram of n x {D} uint8 codes, int64 (g, h): GPU kernel ({name}, CUDA events, best of "
                f"{REPEAT}) vs kernels.trees.build_root on one CPU thread (best of {CPU_REPEAT}); equal: bitwise",
                result, [("rows", "d"), ("d", "d"), ("bins", "d"), ("groups", "d"), ("method", "s"), ("auto", ""),
                         ("gpu_ms", ".3f"), ("cpu_ms", ".1f"), ("speedup", ".1f"), ("equal", "")]))
    print(f"({time.perf_counter() - t0:.0f} s)")
    save("gpu_trees", result, device=name)
    return 0 if all(r["equal"] for r in result) else 1


if __name__ == "__main__":
    sys.exit(main())
