"""GPU kernels: the simulator suite in a subprocess, host-side GPU code, and real-GPU checks.

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so the kernel tests under the
simulator (tests/gpu/sim/) run in a child pytest that has it set: `make test` runs them
on any machine. Tests marked ``gpu`` need a real GPU and skip where none is visible.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_launches_compile_checked, record_launches

from fleetmpi.engine import device
from fleetmpi.errors import BadInput
from kernels import gpu, gpu_mlp
from kernels import reference as ref

NO_GPU = "no CUDA GPU visible (numba.cuda.is_available() is False without the simulator)"


def _real_gpu() -> tuple[bool, str]:
    if gpu.simulated():
        return False, "needs a real GPU: NUMBA_ENABLE_CUDASIM=1 runs numba's CUDA simulator"
    return device.gpu_visible(), NO_GPU


def test_kernel_suite_passes_under_the_cuda_simulator(tmp_path: Path) -> None:
    launches = tmp_path / "launches"
    env = record_launches({**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "NUMBA_NUM_THREADS": "1"}, launches)
    cmd = [sys.executable, "-m", "pytest", "tests/gpu/sim", "-q", "-rs", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{out[-6000:]}"
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 57, out[-2000:]   # 32 of kernels.gpu, 25 of kernels.gpu_trees
    assert "skipped" not in out and "deselected" not in out, out[-2000:]   # they ran, all of them
    assert assert_launches_compile_checked(launches) >= 12   # each kernel at least once (9 + gpu_trees' 3)


@pytest.mark.parametrize("sizes", [(13, 8, 4), (13, 8, 6, 4)])
def test_mlp_array_api_gradient_matches_reference_with_numpy(sizes: tuple[int, ...]) -> None:
    # The code cupy runs on a GPU phase, run here by numpy: the maths is checked anywhere.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((97, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], 97).astype(np.float32)
    p = 0.5 * rng.standard_normal(ref.mlp_param_count(sizes))
    out = np.full(p.size + 1, np.nan)
    gpu_mlp.mlp_grad_xp(np, X, y, p, sizes, out)
    loss, g = ref.mlp_loss_grad(X, y, p, sizes)
    np.testing.assert_allclose(out[:-1], g, rtol=1e-11, atol=1e-11 * np.abs(g).max())
    assert out[-1] == pytest.approx(loss, rel=1e-12)
    gpu_mlp.mlp_grad_xp(np, X[:0], y[:0], p, sizes, out)
    assert not out.any()


def test_importing_gpu_modules_touches_no_gpu_and_no_optional_package() -> None:
    code = ("import sys\n"
            "import kernels.gpu, fleetmpi.engine.device, fleetmpi.models.gpu, fleetmpi.sync.device, fleetmpi.engine.gpu\n"
            "from numba.cuda.cudadrv import driver\n"
            "assert driver.driver.pid is None, 'cuInit ran'\n"
            "bad = [m for m in ('cupy', 'pynvml') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cuda_awareness_follows_the_variable_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(device.CUDA_AWARE_ENV, "1")
    assert device.cuda_aware_mpi() == (True, f"{device.CUDA_AWARE_ENV}=1")
    monkeypatch.setenv(device.CUDA_AWARE_ENV, "0")
    assert device.cuda_aware_mpi()[0] is False
    monkeypatch.setenv(device.CUDA_AWARE_ENV, "yes")
    with pytest.raises(BadInput, match="must be 0 or 1"):
        device.cuda_aware_mpi()
    monkeypatch.delenv(device.CUDA_AWARE_ENV)
    aware, how = device.cuda_aware_mpi()      # the wheel's MPICH is built without CUDA
    assert aware is False and how


def test_mlp_refusal_names_the_fix() -> None:
    assert device.gpu_model_refusal("softmax", "dense") is None
    assert device.gpu_model_refusal("mlp", "exact") is None     # exact: rows' factors on the host
    why = device.gpu_model_refusal("mlp", "dense")
    has_cupy = device._has_cupy()
    assert (why is None) == has_cupy
    if why:
        assert "cupy" in why and "device: cpu or auto" in why


def test_adagrad_is_refused_before_the_gpu_is_taken() -> None:
    # Its per-coordinate sums live on the host: auto falls back to the CPU, gpu says why.
    assert "adagrad" in device.gpu_model_refusal("softmax", "dense", "gpu", "adagrad")
    assert "device: cpu or auto" in device.gpu_model_refusal("softmax", "dense", "gpu", "adagrad")
    auto = device.gpu_model_refusal("linear", "dense", "auto", "adagrad")
    assert "adagrad" in auto and "device:" not in auto
    assert device.gpu_model_refusal("softmax", "dense", "gpu", "sgd") is None


def test_device_lines_for_the_log() -> None:
    from fleetmpi.engine.gpu import _nvml_notes
    d = device.Device("gpu", "auto", 1, "NVIDIA H100", False, False, "local rank 1")
    assert d.describe() == "gpu 1 (NVIDIA H100), MPI not CUDA-aware: pinned host staging [local rank 1]"
    assert device.Device("cpu", "auto", why="device auto: no GPU").describe() == "cpu (device auto: no GPU)"
    assert _nvml_notes(["", ""]) == ()
    (note,) = _nvml_notes(["pynvml missing", "pynvml missing"])
    assert note == "gpu_util and gpu_mem_util are not measured (pynvml missing); rules on them never fire"
    (note,) = _nvml_notes(["", "pynvml missing"])
    assert "rank(s) [1]" in note


def test_small_grids_launch_without_numba_performance_warnings() -> None:
    # numba warns at every launch of fewer than 128 blocks; ours are small by design (the
    # scan is one block). Configuring a launch needs no GPU, so this runs anywhere.
    if gpu.simulated():
        pytest.skip("the simulator never warns")
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        configured = [gpu._exclusive_scan[1, gpu.TPB, 0], gpu._sum_blocks[1, gpu.TPB, 0]]
    assert len(configured) == 2
    assert [str(w.message) for w in seen] == []


def test_a_gpu_node_without_nvvm_is_told_apart_from_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # numba's is_available() is False both without a GPU and without NVVM (the compiler):
    # the message must say which, so a user knows to install the CUDA wheels, not hunt a GPU.
    if gpu.simulated():
        pytest.skip("the simulator always reports a GPU")
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(type(drv.driver), "is_available", property(lambda self: True))
    why = device.gpu_missing()
    assert why is not None and "a CUDA GPU is visible but numba finds no NVVM" in why
    assert "pip install 'fleetmpi[gpu]'" in why
    monkeypatch.setattr(type(drv.driver), "is_available", property(lambda self: False))
    assert device.gpu_missing() == device.NO_GPU
    assert not device.gpu_visible()


@pytest.mark.gpu
def test_real_gpu_logistic_at_64k_rows_matches_reference() -> None:
    ok, why = _real_gpu()
    if not ok:
        pytest.skip(why)
    from numba import cuda
    rng = np.random.default_rng(1)
    n, d = 65536 + 77, 64
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    w = 0.1 * rng.standard_normal(d + 1)
    out = cuda.device_array(d + 2)
    gpu.logistic_grad(cuda.to_device(X), cuda.to_device(y), cuda.to_device(w), out)
    loss, g = ref.logistic_loss_grad(X, y, w)
    got = out.copy_to_host()
    np.testing.assert_allclose(got[:-1], g, rtol=1e-10, atol=1e-10 * np.abs(g).max())
    assert got[-1] == pytest.approx(loss, rel=1e-10)


@pytest.mark.gpu
def test_real_gpu_sgd_update_is_bitwise_numpy() -> None:
    # On a real GPU NVVM would contract a*b+c into an FMA; libdevice's *_rn must prevent it.
    ok, why = _real_gpu()
    if not ok:
        pytest.skip(why)
    from numba import cuda
    rng = np.random.default_rng(2)
    n, B, lr, m, l2 = 100_003, 64, 0.3, 0.9, 1e-3
    p, v, g = rng.standard_normal(n), rng.standard_normal(n), 30 * rng.standard_normal(n)
    mask = np.ones(n)
    want_p, want_v = p.copy(), v.copy()
    grad = g / B
    grad += l2 * mask * want_p
    want_v *= m
    want_v += grad
    want_p -= lr * want_v
    dp, dv = cuda.to_device(p), cuda.to_device(v)
    gpu.sgd_update(dp, dv, cuda.to_device(g), cuda.to_device(mask), B, l2, lr, m)
    assert np.array_equal(dp.copy_to_host(), want_p)
    assert np.array_equal(dv.copy_to_host(), want_v)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["shared", "global"])
def test_real_gpu_tree_histograms_at_200k_rows_are_the_cpu_ones(method: str) -> None:
    # Integer atomics from thousands of blocks in the GPU's own order: still the CPU's sums.
    ok, why = _real_gpu()
    if not ok:
        pytest.skip(why)
    from numba import cuda

    from kernels import gpu_trees
    from kernels import trees as T
    rng = np.random.default_rng(3)
    n, d = 200_000, 32
    ncuts = rng.integers(0, 255, d).astype(np.int32)   # 1 to 255 bins a feature: 3769 bins, 2 shared groups
    foff = T.feature_offsets(ncuts)
    codes = (rng.random((n, d)) * (ncuts + 1)).astype(np.uint8)
    gh = rng.integers(-(2**40), 2**40, (n, 2), dtype=np.int64)
    order = rng.permutation(n).astype(np.int32)
    bounds = np.sort(rng.integers(0, n, 15))
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
    layout = gpu_trees.Layout(foff)
    dcodes, dgh = cuda.to_device(codes), cuda.to_device(gh)
    root = gpu_trees.build_root(dcodes, dgh, layout, method=method).copy_to_host()
    assert np.array_equal(root, T.build_root(codes, gh, foff))
    level = gpu_trees.build_histograms(dcodes, dgh, cuda.to_device(order), cuda.to_device(starts),
                                       cuda.to_device(counts), layout, method=method).copy_to_host()
    assert np.array_equal(level, T.build_histograms(codes, gh[:, 0].copy(), gh[:, 1].copy(), order, starts, counts,
                                                    foff))
    assert np.array_equal(level.sum(axis=0), root[0])
