"""GPU kernels against the device's own copy bandwidth; GPU phases against a 1-rank CPU phase; the MLP step.

1. Kernels: the fused logistic, linear and softmax (k=10) gradients (``kernels.gpu``,
   partials + fixed-order reduction) over X float32 (n x d) at n >= 64k rows, timed
   with CUDA events, against a device-to-device copy of the same bytes measured in the
   same run. Traffic is counted as the bytes the kernel must read from DRAM, X and y
   (its second pass over a tile hits L1/L2; softmax also writes and re-reads its n x k
   float64 residuals, which are not counted); a copy reads and writes every byte.
   Goal: kernel GB/s >= 60 % of copy GB/s for the logistic and softmax gradients.
2. Phases: one `fleetmpi run` of the same spec with the phase on ``device: cpu`` (1 rank,
   one thread, as `make bench` runs it) and on ``device: gpu``; samples/s of the logged
   steps (HDF5 read, copies, kernels, sync, update). Three specs: logistic 200k x 64
   (memory-bound on both), softmax k=10 on d=256 and an MLP 784-512-512-10 (compute-
   bound on the CPU). Goal: >= 10x on the compute-bound ones.
3. The MLP step (784-128-10, float64 as the GPU phase computes it): fleetmpi's (cupy
   BLAS gradient + the numba SGD update) against PyTorch CUDA's (forward, backward,
   SGD with momentum) in float64 and float32, batch 128 and 4096, wall time per step
   with the device synchronised. Where torch or cupy is missing the rows say so.

Needs a real GPU. Under numba's CUDA simulator, or where numba sees no GPU, it prints
"no GPU: skipped" and exits 0: simulated timings would be fiction.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import fleetrun
from common import save, table

REPEAT = 20
GOAL_FRACTION = 0.60
GOAL_PHASE = 10.0
MLP_SIZES = (784, 128, 10)
MLP_BATCHES = (128, 4096)
KERNEL_SIZES = ((65536, 64), (262144, 64), (1048576, 64), (262144, 256), (1048576, 256))


def device_info() -> dict[str, Any]:
    """Return the GPU's name, driver and CUDA versions as nvidia-smi and the CUDA runtime report them."""
    info: dict[str, Any] = {}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        name, driver, mem, clock = (c.strip() for c in q.stdout.splitlines()[0].split(","))
        info.update(gpu=name, driver=driver, memory=mem, max_sm_clock=clock)
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", head)
        info["cuda_driver_api"] = m.group(1) if m else None
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"failed: {e}"
    from numba import cuda
    # numba-cuda's cuda.runtime.get_version() reports NVRTC's version, not a runtime's: ask
    # the driver API and NVVM themselves (what builds and loads the kernels).
    for key, get in (("driver_api", lambda: cuda.cudadrv.driver.driver.get_version()),
                     ("ptx_isa_emitted", ptx_isa)):
        try:
            info[key] = ".".join(map(str, get()))
        except Exception as e:     # an older numba-cuda or binding: say so, do not fail the bench
            info[key] = f"unknown ({type(e).__name__})"
    import numba
    info["numba"] = numba.__version__
    for mod in ("numba_cuda", "cupy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def ptx_isa() -> tuple[int, ...]:
    """Return the PTX ISA version NVVM writes here: the driver's JIT must accept it (or nvJitLink link it)."""
    from numba import cuda, float64

    def one(a: Any) -> None:
        a[0] = 1.0

    ptx, _ = cuda.compile_ptx(one, (float64[::1],), cc=(9, 0))
    m = re.search(r"^\.version\s+(\d+)\.(\d+)", ptx, re.M)
    return (int(m.group(1)), int(m.group(2))) if m else ()


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
    k = 10
    for n, d in KERNEL_SIZES:
        X = cuda.to_device(rng.standard_normal((n, d)).astype(np.float32), stream=stream)
        y = cuda.to_device((rng.random(n) < 0.5).astype(np.float32), stream=stream)
        yk = cuda.to_device(rng.integers(0, k, n).astype(np.float32), stream=stream)
        w = cuda.to_device(0.1 * rng.standard_normal(d + 1), stream=stream)
        W = cuda.to_device(0.1 * rng.standard_normal((d + 1) * k), stream=stream)
        out = cuda.device_array(d + 2, stream=stream)
        outk = cuda.device_array((d + 1) * k + 1, stream=stream)
        part = gpu.partials(n, d + 1, stream)
        partk = gpu.partials(n, (d + 1) * k, stream)
        resid = cuda.device_array((n, k), np.float64, stream=stream)
        flat = X.reshape(n * d)
        dst = cuda.device_array(n * d, np.float32, stream=stream)
        copy_ms = _time_ms(lambda: dst.copy_to_device(flat, stream=stream), stream)
        copy_gbs = 2 * flat.nbytes / copy_ms / 1e6
        runs = (("logistic", lambda: gpu.logistic_grad(X, y, w, out, part, stream)),
                ("linear", lambda: gpu.linear_grad(X, y, w, out, part, stream)),
                ("softmax10", lambda: gpu.softmax_grad(X, yk, W, k, outk, partk, resid, stream)))
        for kind, fn in runs:
            ms = _time_ms(fn, stream)
            gbs = (X.nbytes + y.nbytes) / ms / 1e6
            rows.append({"kernel": kind, "rows": n, "d": d, "kernel_ms": ms, "kernel_GBps": gbs,
                         "copy_GBps": copy_gbs, "fraction": gbs / copy_gbs})
    return rows


PHASES = (
    # name, make-data arguments, model (None: logistic), batch, CPU steps, GPU steps
    ("logistic 200k x 64", ["--task", "binary", "--n", "250000", "--d", "64"], None, 4096, 300, 600),
    ("softmax k=10, d=256", ["--task", "multiclass", "--classes", "10", "--n", "120000", "--d", "256"],
     {"kind": "softmax", "l2": 1e-5}, 4096, 200, 600),
    ("mlp 784-512-512-10", ["--task", "multiclass", "--classes", "10", "--n", "60000", "--d", "784"],
     {"kind": "mlp", "hidden": [512, 512], "l2": 1e-5}, 1024, 30, 600),
)


def phases(tmp: Path) -> list[dict]:
    """Return samples/s of each spec's phase on the CPU (1 rank, 1 thread) and on the GPU."""
    rows = []
    for i, (name, data_args, model, batch, cpu_steps, gpu_steps) in enumerate(PHASES):
        data = tmp / f"data{i}"
        subprocess.run([sys.executable, "-m", "fleetmpi.cli", "make-data", *data_args, "--valid-fraction", "0.05",
                        "--out", str(data)], check=True, capture_output=True, env=fleetrun.ENV)
        rate = {}
        for device, steps in (("cpu", cpu_steps), ("gpu", gpu_steps)):
            spec = fleetrun.throughput_spec(data, batch, 0, device, model, max_steps=steps)
            rate[device] = fleetrun.run(spec, tmp, f"p{i}-{device}").samples_per_s(batch)
        for device in ("cpu", "gpu"):
            rows.append({"phase": name, "device": device, "batch": batch, "samples_per_s": rate[device],
                         "ratio": rate[device] / rate["cpu"]})
    return rows


def _wall_ms(step, sync, repeat: int = 5, number: int = 50) -> float:
    """Return the median over ``repeat`` tries of the wall ms per call of ``step``, device synchronised."""
    for _ in range(10):
        step()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            step()
        sync()
        times.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(times)


def mlp_steps() -> list[dict]:
    """Return ms per MLP step: fleetmpi's GPU step against PyTorch CUDA's, same sizes and batch."""
    from numba import cuda

    from kernels import gpu, gpu_mlp
    from kernels import reference as ref
    rows: list[dict] = []
    sizes = MLP_SIZES
    n_params = ref.mlp_param_count(sizes)
    rng = np.random.default_rng(1)
    try:
        import cupy as cp
    except ImportError:
        cp = None
    try:
        import torch
        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    for batch in MLP_BATCHES:
        Xh = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        yh = rng.integers(0, sizes[-1], batch)
        if cp is not None:
            stream = cuda.stream()
            X, y = cuda.to_device(Xh, stream=stream), cuda.to_device(yh.astype(np.float32), stream=stream)
            p = cuda.to_device(0.05 * rng.standard_normal(n_params), stream=stream)
            v, mask = cuda.to_device(np.zeros(n_params), stream=stream), cuda.to_device(np.ones(n_params), stream=stream)
            out = cuda.device_array(n_params + 1, stream=stream)
            g = out[:n_params]
            cX, cy, cp_p, cout = cp.asarray(X), cp.asarray(y), cp.asarray(p), cp.asarray(out)

            def ours() -> None:
                # What a GPU phase's SGD step runs (models.gpu.GpuModel._mlp, then the update kernel).
                with cp.cuda.ExternalStream(int(stream)):
                    gpu_mlp.mlp_grad_xp(cp, cX, cy, cp_p, sizes, cout)
                gpu.sgd_update(p, v, g, mask, batch, 1e-5, 0.01, 0.9, stream)

            rows.append({"impl": "fleetmpi (cupy + numba)", "dtype": "float64", "batch": batch,
                         "ms_per_step": _wall_ms(ours, stream.synchronize)})
        else:
            rows.append({"impl": "fleetmpi (cupy + numba)", "dtype": "float64", "batch": batch, "ms_per_step": None,
                         "note": "cupy is not installed"})
        if not has_torch:
            rows.append({"impl": "torch", "dtype": "-", "batch": batch, "ms_per_step": None,
                         "note": "PyTorch with CUDA is not installed here"})
            continue
        for dtype in (torch.float64, torch.float32):
            dev = torch.device("cuda")
            layers: list[Any] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
            model = torch.nn.Sequential(*layers[:-1]).to(dev, dtype)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
            Xt = torch.as_tensor(Xh, device=dev).to(dtype)
            yt = torch.as_tensor(yh, device=dev)

            def theirs() -> None:
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(Xt), yt, reduction="sum")
                loss.backward()
                opt.step()

            rows.append({"impl": "torch", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                         "ms_per_step": _wall_ms(theirs, torch.cuda.synchronize)})
    for r in rows:
        for dtype, col in (("float64", "torch64_over_this"), ("float32", "torch32_over_this")):
            base = next((q["ms_per_step"] for q in rows if q["batch"] == r["batch"] and q["impl"] == "torch"
                         and q["dtype"] == dtype), None)
            r[col] = base / r["ms_per_step"] if base and r["ms_per_step"] else None
    return rows


def main() -> int:
    from fleetmpi.engine.device import gpu_visible, simulated
    if simulated() or not gpu_visible():
        print("no GPU: skipped")
        return 0
    info = device_info()
    print("device:", ", ".join(f"{k} {v}" for k, v in info.items()))
    name = info.get("gpu") or "unknown GPU"
    meta = {k: v for k, v in info.items() if k != "gpu"}
    parts = os.environ.get("BENCH_PARTS", "kernels,mlp,phases").split(",")
    rows: list[dict] = []
    # Each part is saved as soon as it is measured: a borrowed machine's time may run out.
    if "kernels" in parts:
        krows = kernels()
        print(table(f"GPU gradient kernels on {name}: GB/s of X+y read vs D2D copy GB/s (read + write) "
                    f"of the same bytes; goal logistic, softmax >= {GOAL_FRACTION:.0%}",
                    krows, [("kernel", "s"), ("rows", "d"), ("d", "d"), ("kernel_ms", ".3f"),
                            ("kernel_GBps", ".0f"), ("copy_GBps", ".0f"), ("fraction", ".2f")]))
        rows += [{"part": "kernel", **r} for r in krows]
        save("gpu", rows, device=name, **meta)
    if "mlp" in parts:
        mrows = mlp_steps()
        print()
        print(table(f"MLP {'-'.join(map(str, MLP_SIZES))} step on {name}: wall ms per step, device synchronised",
                    mrows, [("impl", "s"), ("dtype", "s"), ("batch", "d"), ("ms_per_step", ".3f"),
                            ("torch64_over_this", ".2f"), ("torch32_over_this", ".2f")]))
        rows += [{"part": "mlp_step", **r} for r in mrows]
        save("gpu", rows, device=name, **meta)
    if "phases" in parts:
        with tempfile.TemporaryDirectory() as t:
            prows = phases(Path(t))
        print()
        print(table(f"fleetmpi run, 1 rank: GPU phase vs CPU phase (1 thread), samples/s of the logged steps; "
                    f"goal >= {GOAL_PHASE:.0f}x on the compute-bound specs",
                    prows, [("phase", "s"), ("device", "s"), ("batch", "d"), ("samples_per_s", ".0f"),
                            ("ratio", ".2f")]))
        rows += [{"part": "phase", **r} for r in prows]
        save("gpu", rows, device=name, **meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
