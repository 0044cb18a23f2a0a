"""GPU kernel bandwidth against the device's own copy bandwidth; a GPU phase against a CPU phase.

1. Kernels: the fused logistic / linear gradient (``kernels.gpu``, partials + fixed-order
   reduction) over X float32 (n x d) at n >= 64k rows, timed with CUDA events, against a
   device-to-device copy of the same bytes (``cuMemcpyDtoD``) measured in the same run.
   Traffic is counted as DRAM bytes: the kernel reads X and y once (its second pass over
   a tile hits L1/L2), a copy reads and writes every byte. Goal: kernel GB/s >= 60 % of
   copy GB/s for the logistic gradient.
2. Phases: one `fleetmpi run` of the same spec (logistic, 200k x 64, batch 4096) with the
   phase on `device: cpu` and on `device: gpu`; samples/s from first step to goal.

Needs a real GPU. Under numba's CUDA simulator, or where numba sees no GPU, it prints
"no GPU: skipped" and exits 0: simulated timings would be fiction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import fleetrun
from common import save, table

REPEAT = 20
GOAL_FRACTION = 0.60


def _time_ms(fn, stream) -> float:
    """Return the best time of ``fn()`` on ``stream`` over REPEAT tries, in ms (CUDA events)."""
    from numba import cuda
    fn()
    stream.synchronize()
    best = float("inf")
    for _ in range(REPEAT):
        start, end = cuda.event(), cuda.event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        best = min(best, cuda.event_elapsed_time(start, end))
    return best


def kernels() -> list[dict]:
    from numba import cuda

    from kernels import gpu
    stream = cuda.stream()
    rng = np.random.default_rng(0)
    rows = []
    for n, d in ((65536, 64), (262144, 64), (1048576, 64), (262144, 256)):
        X = cuda.to_device(rng.standard_normal((n, d)).astype(np.float32), stream=stream)
        y = cuda.to_device((rng.random(n) < 0.5).astype(np.float32), stream=stream)
        w = cuda.to_device(0.1 * rng.standard_normal(d + 1), stream=stream)
        out = cuda.device_array(d + 2, stream=stream)
        part = gpu.partials(n, d + 1, stream)
        flat = X.reshape(n * d)
        dst = cuda.device_array(n * d, np.float32, stream=stream)
        copy_ms = _time_ms(lambda: dst.copy_to_device(flat, stream=stream), stream)
        copy_gbs = 2 * flat.nbytes / copy_ms / 1e6
        for kind, fn in (("logistic", gpu.logistic_grad), ("linear", gpu.linear_grad)):
            ms = _time_ms(lambda: fn(X, y, w, out, part, stream), stream)
            gbs = (X.nbytes + y.nbytes) / ms / 1e6
            rows.append({"kernel": kind, "rows": n, "d": d, "kernel_ms": ms, "kernel_GBps": gbs,
                         "copy_GBps": copy_gbs, "fraction": gbs / copy_gbs})
    return rows


def phase_rate(data: Path, tmp: Path, device: str) -> float:
    """Return samples/s of a 1-rank logistic phase on ``device`` (first step -> goal)."""
    return fleetrun.run(fleetrun.throughput_spec(data, 4096, 3, device), tmp, device).train_rate(4096)


def main() -> int:
    from fleetmpi.engine.device import gpu_visible, simulated
    if simulated() or not gpu_visible():
        print("no GPU: skipped")
        return 0
    from numba import cuda
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else str(name)
    krows = kernels()
    print(table(f"GPU gradient kernels on {name}: GB/s of X+y read vs D2D copy GB/s (read + write) "
                f"of the same bytes; goal logistic >= {GOAL_FRACTION:.0%}",
                krows, [("kernel", "s"), ("rows", "d"), ("d", "d"), ("kernel_ms", ".3f"), ("kernel_GBps", ".0f"),
                        ("copy_GBps", ".0f"), ("fraction", ".2f")]))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        subprocess.run([sys.executable, "-m", "fleetmpi.cli", "make-data", "--task", "binary", "--n", "250000",
                        "--d", "64", "--valid-fraction", "0.2", "--out", str(tmp / "data")], check=True,
                       capture_output=True)
        cpu_rate = phase_rate(tmp / "data", tmp, "cpu")
        gpu_rate = phase_rate(tmp / "data", tmp, "gpu")
    prows = [{"phase": "cpu", "samples_per_s": cpu_rate, "ratio": 1.0},
             {"phase": "gpu", "samples_per_s": gpu_rate, "ratio": gpu_rate / cpu_rate}]
    print()
    print(table("fleetmpi run, 1 rank, logistic 200k x 64, batch 4096: GPU phase vs CPU phase",
                prows, [("phase", "s"), ("samples_per_s", ".0f"), ("ratio", ".2f")]))
    save("gpu", krows + prows, device=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
