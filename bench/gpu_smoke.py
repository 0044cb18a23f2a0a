"""First thing on a borrowed GPU: can this environment build, link and launch our kernels?

Prints the driver, NVVM and library versions and the GPU's compute mode, launches one
``kernels.gpu`` kernel and checks its result, and runs one cupy elementwise kernel (cupy
compiles those with NVRTC at first use). Exits 1 at the first failure, so that
``bench/gpu_check.sh`` stops before spending the machine's time on steps that cannot work.
Known ways to fail: NVVM newer than the driver's PTX JIT with no nvJitLink to link
(CUDA_ERROR_UNSUPPORTED_PTX_VERSION), cupy without NVRTC or CUDA headers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    from numba import cuda
    if not cuda.is_available():
        print("no CUDA GPU visible to numba: nothing else can run")
        return 1
    try:
        mode = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_mode", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        mode = f"nvidia-smi failed: {e}"
    print("gpu, compute mode:", mode)
    if "Exclusive" in mode:
        print("note: an exclusive compute mode lets one process hold the GPU: 2 ranks sharing it will fail")
    print("driver API version:", cuda.cudadrv.driver.driver.get_version())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import ptx_isa
    print("PTX ISA NVVM writes:", ptx_isa(), "(the driver's JIT takes up to its CUDA version's; nvJitLink links newer)")
    try:
        from cuda.bindings import nvjitlink
        print("nvJitLink version:", nvjitlink.version())
    except Exception as e:
        print("nvJitLink: not available", type(e).__name__)
    from kernels import gpu
    p = cuda.to_device(np.array([1.0, 2.0, 3.0]))
    v = cuda.to_device(np.zeros(3))
    g = cuda.to_device(np.array([4.0, 8.0, 12.0]))
    mask = cuda.to_device(np.ones(3))
    gpu.sgd_update(p, v, g, mask, 4.0, 0.0, 0.5, 0.0)
    got = p.copy_to_host()
    want = np.array([1.0, 2.0, 3.0]) - 0.5 * np.array([1.0, 2.0, 3.0])
    print("numba kernel launch:", got, "ok" if np.array_equal(got, want) else f"WRONG, want {want}")
    if not np.array_equal(got, want):
        return 1
    try:
        import cupy as cp
    except ImportError:
        print("cupy: not installed (the MLP's GPU phase and its bench rows need it)")
        return 0
    print("cupy", cp.__version__, "elementwise:", float(cp.exp(cp.zeros(3)).sum()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
