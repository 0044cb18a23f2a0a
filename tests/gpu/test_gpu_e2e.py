"""GPU phases end to end under numba's CUDA simulator: the real CLI, real mpiexec, real HDF5.

Every GPU phase here runs the whole GPU path (device arrays, pinned staging, streams,
kernels, device-side threshold coding) with NUMBA_ENABLE_CUDASIM=1, where "device" memory
is host memory and kernels run on the CPU. A cpu -> gpu -> cpu run resumes each phase
from the last one's checkpoint and must end where a CPU-only run of the same spec ends:
within 1e-5 (dense, threshold), bit for bit (exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_launches_compile_checked, cli, events, metrics, record_launches, write_spec

from fleetmpi.engine import checkpoint
from fleetmpi.h5store import read_h5_verified

pytestmark = pytest.mark.slow

SIM = {"NUMBA_ENABLE_CUDASIM": "1", "NUMBA_NUM_THREADS": "1"}
STEPS = 15
LBFGS_IN_GPU = {"in": "g", "when": "step >= 8", "then": {"optimizer": "lbfgs"}}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """200 training and 50 validation rows per task (the simulator is slow)."""
    base = tmp_path_factory.mktemp("small")
    out = {}
    for task, extra in (("multiclass", ["--classes", "3"]), ("binary", []), ("regression", [])):
        cli("make-data", "--task", task, "--n", "250", "--d", "12", "--seed", "5", *extra,
            "--out", str(base / task), check=True)
        out[task] = base / task
    return out


def _spec(path: Path, data: Path, model: dict[str, Any], sync: dict[str, Any], ranks: int,
          devices: tuple[str, str, str], rules: tuple[dict[str, Any], ...] = ()) -> Path:
    phases = {name: {"ranks_per_node": ranks, "device": dev} for name, dev in zip("agc", devices)}
    fleet = {"start": "a", "phases": phases,
             "rules": [{"in": "a", "when": "step >= 5", "then": {"goto": "g"}},
                       {"in": "g", "when": "step >= 10", "then": {"goto": "c"}}, *rules]}
    return write_spec(path, data, model=model, sync=sync, fleet=fleet, goal={"max_steps": STEPS},
                      optimizer={"kind": "sgd", "lr": 0.2, "momentum": 0.9, "batch": 50,
                                 "schedule": {"kind": "cosine", "total_steps": STEPS}},
                      checkpoint={"every_steps": 100, "keep": 5},
                      monitor={"log_every_steps": 1, "eval_every_steps": 3})


def _run(tmp: Path, name: str, spec: Path, env: dict[str, str] | None = None) -> tuple[Path, str]:
    job, launches = tmp / name, tmp / f"{name}.launches"
    simulated = bool(env) and env.get("NUMBA_ENABLE_CUDASIM") == "1"
    if simulated:
        env = record_launches(env, launches)
    proc = cli("run", str(spec), "--job-dir", str(job), env=env, timeout=400)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if simulated and any(e["device"] == "gpu" for e in events(job) if e["event"] == "phase_start"):
        assert_launches_compile_checked(launches)   # what the GPU phase launched is what the compile check compiles
    return job, proc.stdout + proc.stderr


def _params(job: Path) -> np.ndarray:
    return read_h5_verified(job / "model.h5", kind="model")[0]["params"]


def _devices(job: Path) -> list[tuple[str, str, int]]:
    return [(e["phase"], e["device"], e["step"]) for e in events(job) if e["event"] == "phase_start"]


SOFTMAX = {"kind": "softmax", "l2": 1e-4}
LOGISTIC = {"kind": "logistic", "l2": 1e-4}


@pytest.fixture(scope="module")
def cpu_only(small: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Final parameters of the CPU-only runs (1 rank, same rules) the GPU runs must match."""
    tmp = tmp_path_factory.mktemp("cpu_only")
    out = {}
    spec = _spec(tmp / "dense.yaml", small["multiclass"], SOFTMAX, {"kind": "dense"}, 1, ("cpu",) * 3,
                 (LBFGS_IN_GPU,))
    out["dense"] = _params(_run(tmp, "dense", spec)[0])
    spec = _spec(tmp / "exact.yaml", small["binary"], LOGISTIC, {"kind": "exact"}, 1, ("cpu",) * 3)
    out["exact"] = _params(_run(tmp, "exact", spec)[0])
    return out


@pytest.mark.parametrize("ranks", [1, 2])
def test_dense_cpu_gpu_cpu_matches_cpu_only(tmp_path: Path, small: dict[str, Path], cpu_only: dict, ranks: int) -> None:
    # 2 ranks: the GPU phase says device auto, which the simulator makes a GPU. The phase
    # switches to L-BFGS at step 9 and hands its state on to the CPU phase.
    gpu = "gpu" if ranks == 1 else "auto"
    spec = _spec(tmp_path / "s.yaml", small["multiclass"], SOFTMAX, {"kind": "dense"}, ranks, ("cpu", gpu, "cpu"),
                 (LBFGS_IN_GPU,))
    job, log = _run(tmp_path, "job", spec, SIM)
    assert _devices(job) == [("a", "cpu", 0), ("g", "gpu", 6), ("c", "cpu", 12)]
    assert [e["step"] for e in events(job) if e["event"] == "optimizer_switch"] == [9]
    p, want = _params(job), cpu_only["dense"]
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.5
    assert "pinned host staging" in log
    assert "note: gpu_util and gpu_mem_util are not measured" in log
    gpu_steps = [m for m in metrics(job) if not m.get("eval") and m["phase"] == "g"]
    assert [m["step"] for m in gpu_steps] == list(range(7, 13))
    assert all(m["sync_bytes_per_step"] > 0 and np.isfinite(m["loss"]) for m in gpu_steps)
    assert not any("gpu_util" in m for m in metrics(job))    # absent, never a made-up number


@pytest.mark.parametrize("ranks", [1, 2])
def test_exact_cpu_gpu_cpu_is_bitwise_cpu_only(tmp_path: Path, small: dict[str, Path], cpu_only: dict,
                                               ranks: int) -> None:
    spec = _spec(tmp_path / "s.yaml", small["binary"], LOGISTIC, {"kind": "exact"}, ranks, ("cpu", "gpu", "cpu"))
    job, _ = _run(tmp_path, "job", spec, SIM)
    assert _devices(job) == [("a", "cpu", 0), ("g", "gpu", 6), ("c", "cpu", 12)]
    p, want = _params(job), cpu_only["exact"]
    assert np.array_equal(p, want), f"max |diff| {np.abs(p - want).max():.3g}"
    assert np.abs(want).max() > 0.5


def _skip_without_a_real_gpu(cupy: bool = False) -> None:
    from fleetmpi.engine import device
    why = "needs a real GPU: NUMBA_ENABLE_CUDASIM=1 runs numba's CUDA simulator" if device.simulated() \
        else device.gpu_missing()
    if not why and cupy:
        why = device.gpu_model_refusal("mlp", "dense")
    if why:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("sync", ["dense", "exact"])
def test_real_gpu_phase_matches_cpu_only(tmp_path: Path, small: dict[str, Path], cpu_only: dict, sync: str,
                                         ranks: int) -> None:
    # The same cpu -> gpu -> cpu jobs on a real GPU: NVVM-compiled kernels, real streams,
    # pinned memory and copies; at 2 ranks both share the one GPU (local rank % visible).
    # Dense within 1e-5 of the 1-rank CPU-only run, exact bit for bit.
    _skip_without_a_real_gpu()
    model, data, rules = (SOFTMAX, small["multiclass"], (LBFGS_IN_GPU,)) if sync == "dense" else \
        (LOGISTIC, small["binary"], ())
    spec = _spec(tmp_path / "s.yaml", data, model, {"kind": sync}, ranks, ("cpu", "gpu", "cpu"), rules)
    job, log = _run(tmp_path, "job", spec, {"NUMBA_ENABLE_CUDASIM": "0"})
    assert _devices(job) == [("a", "cpu", 0), ("g", "gpu", 6), ("c", "cpu", 12)]
    assert "CUDA simulator" not in log
    assert "pinned host staging" in log or "CUDA-aware MPI: device buffers" in log
    p, want = _params(job), cpu_only[sync]
    if sync == "exact":
        assert np.array_equal(p, want), f"max |diff| {np.abs(p - want).max():.3g}"
    else:
        np.testing.assert_allclose(p, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_real_gpu_mlp_on_cupy_matches_cpu_only(tmp_path: Path, small: dict[str, Path]) -> None:
    # The MLP's GPU phase: cupy's BLAS on views of the phase's device arrays, the numba
    # SGD update. Float64 on both sides; only the BLAS's summation order differs.
    _skip_without_a_real_gpu(cupy=True)
    model = {"kind": "mlp", "hidden": [16], "l2": 1e-4}
    params = {}
    for name, devices, env in (("gpu", ("cpu", "gpu", "cpu"), {"NUMBA_ENABLE_CUDASIM": "0"}),
                               ("cpu", ("cpu",) * 3, None)):
        spec = _spec(tmp_path / f"{name}.yaml", small["multiclass"], model, {"kind": "dense"}, 1, devices)
        params[name] = _params(_run(tmp_path, name, spec, env)[0])
    assert _devices(tmp_path / "gpu") == [("a", "cpu", 0), ("g", "gpu", 6), ("c", "cpu", 12)]
    np.testing.assert_allclose(params["gpu"], params["cpu"], rtol=0, atol=1e-8)
    assert np.abs(params["cpu"]).max() > 0.1


def test_threshold_on_device_buffers_matches_cpu_and_keeps_residuals(tmp_path: Path, small: dict[str, Path]) -> None:
    # FLEETMPI_CUDA_AWARE_MPI=1 takes the device-buffer path: under the simulator "device"
    # arrays are host memory, so the MPICH wheel can serve it. Threshold results depend on
    # the rank count (per-rank residuals), so the CPU run has 2 ranks too.
    model, sync = {"kind": "linear", "l2": 1e-4}, {"kind": "threshold", "tau": 0.5, "adaptive": True}
    jobs = {}
    for name, devices, env in (("gpu", ("cpu", "gpu", "cpu"), {**SIM, "FLEETMPI_CUDA_AWARE_MPI": "1"}),
                               ("cpu", ("cpu",) * 3, None)):
        spec = _spec(tmp_path / f"{name}.yaml", small["regression"], model, sync, 2, devices)
        jobs[name], log = _run(tmp_path, name, spec, env)
        if name == "gpu":
            assert "CUDA-aware MPI: device buffers" in log
    assert _devices(jobs["gpu"]) == [("a", "cpu", 0), ("g", "gpu", 6), ("c", "cpu", 12)]
    np.testing.assert_allclose(_params(jobs["gpu"]), _params(jobs["cpu"]), rtol=0, atol=1e-5)
    # The GPU phase's checkpoint holds its residuals and adapted tau, as a CPU phase's would.
    ck = {c.step: c for c in (checkpoint.load(p) for p in checkpoint.list_checkpoints(jobs["gpu"] / "ckpt"))}
    ref = {c.step: c for c in (checkpoint.load(p) for p in checkpoint.list_checkpoints(jobs["cpu"] / "ckpt"))}
    assert np.abs(ck[12].arrays["sync_residual"]).max() > 0
    np.testing.assert_allclose(ck[12].arrays["sync_residual"], ref[12].arrays["sync_residual"], rtol=0, atol=1e-5)
    assert ck[12].arrays["sync_tau"][0] == pytest.approx(ref[12].arrays["sync_tau"][0], rel=1e-12)


def test_device_gpu_without_a_gpu_is_bad_input_and_auto_falls_back(tmp_path: Path, small: dict[str, Path]) -> None:
    no_sim = {"CUDA_VISIBLE_DEVICES": "", "NUMBA_ENABLE_CUDASIM": "0"}   # no simulator, and no real GPU either
    base = {"model": LOGISTIC, "goal": {"max_steps": 2}, "monitor": {"log_every_steps": 1, "eval_every_steps": 1}}
    for setting in ("gpu", "auto"):
        spec = write_spec(tmp_path / f"{setting}.yaml", small["binary"], **base,
                          fleet={"start": "x", "phases": {"x": {"ranks_per_node": 1, "device": setting}}})
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / setting), env=no_sim)
        if setting == "gpu":
            assert proc.returncode == 2, proc.stderr
            assert "fleet.phases.x.device is gpu but this node: no CUDA GPU visible" in proc.stderr
            assert "Traceback" not in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
            assert _devices(tmp_path / setting) == [("x", "cpu", 0)]
            assert "device cpu (device auto: this node: no CUDA GPU visible" in proc.stdout + proc.stderr


def test_mlp_on_gpu_without_cupy_is_refused_and_auto_uses_the_cpu(tmp_path: Path, small: dict[str, Path]) -> None:
    # Under the simulator the MLP is refused whether cupy is installed or not.
    base = {"model": {"kind": "mlp", "hidden": [8], "l2": 1e-4}, "goal": {"max_steps": 2},
            "monitor": {"log_every_steps": 1, "eval_every_steps": 1}}
    for setting in ("gpu", "auto"):
        spec = write_spec(tmp_path / f"{setting}.yaml", small["multiclass"], **base,
                          fleet={"start": "x", "phases": {"x": {"ranks_per_node": 1, "device": setting}}})
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / setting), env=SIM)
        if setting == "gpu":
            assert proc.returncode == 2, proc.stderr
            assert "fleet.phases.x.device: model kind mlp on a gpu phase needs cupy" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
            assert _devices(tmp_path / setting) == [("x", "cpu", 0)]
