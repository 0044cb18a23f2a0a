"""The GPU kernels compile for real GPUs (NVVM -> PTX -> ptxas machine code), no GPU needed.

The simulator tests run the kernels' Python; these compile them the way a GPU node
would, for compute capabilities 8.0 and 9.0, with the argument types the launchers pass
(tests/gpu/test_gpu_kernels.py and tests/gpu/test_gpu_e2e.py check every simulated launch against
that table). Needs the `gpu-compile` extra (numba-cuda, NVVM, NVRTC, ptxas wheels), which
`make test` installs: under CI=true a missing tool chain fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT

from kernels import gpu_compile


def _toolchain_missing() -> str | None:
    """Return why the compile check cannot run here, or None."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        for lib in ("nvvm", "nvrtc"):
            load_nvidia_dynamic_lib(lib)
    except Exception as exc:   # ImportError without numba-cuda, DynamicLibNotFoundError without the wheels
        return f"no CUDA compile tool chain ({type(exc).__name__}: {str(exc)[:200]}); pip install -e '.[gpu-compile]'"
    if gpu_compile.find_ptxas() is None:
        return "no ptxas (nvidia-cuda-nvcc wheel or CUDA on PATH); pip install -e '.[gpu-compile]'"
    return None


@pytest.fixture(scope="module")
def compiled() -> list[dict[str, Any]]:
    why = _toolchain_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    # A child process: NUMBA_ENABLE_CUDASIM must be unset when numba is first imported.
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "kernels.gpu_compile", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout)
    assert report["ptxas"], report
    return list(report["kernels"])


def _rows(compiled: list[dict[str, Any]], kernel: str) -> list[dict[str, Any]]:
    rows = [r for r in compiled if r["kernel"] == kernel]
    assert {r["cc"] for r in rows} == {"8.0", "9.0"}, rows
    return rows


def test_every_gpu_kernel_is_in_the_compile_table() -> None:
    # A kernel added to kernels.gpu or kernels.gpu_trees without a signature here would first compile on a user's GPU.
    table = {kernel.py_func.__name__ for kernel, _ in gpu_compile.signatures().values()}
    assert gpu_compile.module_kernels() <= table
    assert len(gpu_compile.module_kernels()) >= 8


def test_all_kernels_compile_and_assemble_for_sm80_and_sm90(compiled: list[dict[str, Any]]) -> None:
    names = {r["kernel"] for r in compiled}
    assert names == set(gpu_compile.signatures()), names
    for r in compiled:
        assert r["ptx_lines"] > 20 and r["registers"] > 0, r


def test_sgd_update_has_no_fused_multiply_add(compiled: list[dict[str, Any]]) -> None:
    # The GPU update must round as numpy does (bitwise equal to a CPU phase under sync: exact):
    # libdevice's *_rn keep NVVM from contracting a*b+c into one fma. The gradient kernels,
    # where contraction is allowed, show that the count would see one.
    for r in _rows(compiled, "_sgd"):
        assert r["fma"] == 0, r
    assert all(r["fma"] > 0 for r in _rows(compiled, "_glm_partials"))


def test_memory_bound_kernels_do_not_spill(compiled: list[dict[str, Any]]) -> None:
    # A spill turns register traffic into local-memory traffic on the kernels that stream X.
    for name in ("_glm_partials", "_sum_blocks", "_threshold_flags", "_threshold_pack", "_decode_counts", "_sgd"):
        for r in _rows(compiled, name):
            assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
    for r in _rows(compiled, "_glm_partials"):
        assert r["smem_bytes"] == 128 * 33 * 4 + 2 * 128 * 8, r   # X tile (TPB x 33 float32) + two float64 rows


def test_compile_refuses_the_simulator_with_a_clear_line() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    code = "import kernels.gpu_compile as c; c.compile_all()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "NUMBA_ENABLE_CUDASIM=1: the simulator compiles nothing" in proc.stderr
