"""Where a phase computes: device choice, local rank -> GPU, CUDA-aware MPI, NVML, staging.

Importing this module loads numba.cuda (through ``kernels.gpu``, which owns the one
``simulated()``) but no pynvml or cupy, and nothing touches a GPU until a function below
is called: the worker decides (docs/architecture.md: no side effects on import). CPU
phases never import it.

``choose`` resolves a phase's ``device`` setting (cpu | gpu | auto) once, collectively:
``auto`` is the GPU only if every rank sees one (``numba.cuda.is_available()``, True
under numba's CUDA simulator) and the model can train there; otherwise the CPU, with
the reason in the log. Each rank then takes GPU ``local_rank % visible GPUs``, the local
rank being its rank among the ranks of its node (``Split_type(COMM_TYPE_SHARED)``); the
CUDA driver already hides what ``CUDA_VISIBLE_DEVICES`` hides.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetmpi.errors import BadInput
from kernels.gpu import simulated

CUDA_AWARE_ENV = "FLEETMPI_CUDA_AWARE_MPI"
NO_GPU = "no CUDA GPU visible (numba.cuda.is_available() is False without the simulator)"


@dataclass(frozen=True)
class Device:
    """The device one rank computes on for a phase."""

    kind: str                 # "cpu" | "gpu"
    setting: str              # the phase's device setting: cpu | gpu | auto
    index: int | None = None  # CUDA device ordinal among the visible ones
    name: str = ""
    simulated: bool = False   # numba's CUDA simulator: "device" arrays live in host memory
    cuda_aware: bool = False  # MPI reads device buffers itself
    why: str = ""             # why this device (auto) or how MPI-awareness was decided

    def describe(self) -> str:
        """Return one line for the log, e.g. 'gpu 1 (NVIDIA H100), MPI not CUDA-aware: pinned host staging'."""
        if self.kind == "cpu":
            return f"cpu ({self.why})" if self.why else "cpu"
        sim = ", CUDA simulator: kernels run on the CPU" if self.simulated else ""
        mpi = "CUDA-aware MPI: device buffers" if self.cuda_aware else "MPI not CUDA-aware: pinned host staging"
        return f"gpu {self.index} ({self.name}{sim}), {mpi} [{self.why}]"


def gpu_visible() -> bool:
    """Return whether numba sees a CUDA GPU (or its simulator); initialises the CUDA driver."""
    return gpu_missing() is None


def gpu_missing() -> str | None:
    """Return why numba cannot run CUDA kernels on this node, or None if it can.

    numba's ``cuda.is_available()`` needs both a driver with a GPU and NVVM (the compiler,
    from a CUDA toolkit or the numba-cuda wheels): a GPU node without NVVM is told apart
    from a node without a GPU, so the message says what to install.
    """
    from numba import cuda
    try:
        if cuda.is_available():
            return None
    except Exception as exc:   # a broken driver install reads as no GPU, never as a crash
        return f"{NO_GPU}: the CUDA driver failed ({type(exc).__name__}: {str(exc).strip()[:200]})"
    try:
        from numba.cuda.cudadrv.driver import driver
        has_gpu = bool(driver.is_available)
    except Exception:
        has_gpu = False
    if has_gpu:
        return ("a CUDA GPU is visible but numba finds no NVVM (the CUDA compiler): "
                "pip install 'fleetmpi[gpu]' (numba-cuda with the CUDA wheels) or load a CUDA toolkit")
    return NO_GPU


# Model kinds with device kernels (kernels/gpu.py, kernels/gpu_mlp.py).
GPU_MODEL_KINDS = ("linear", "logistic", "softmax", "mlp")


def gpu_model_refusal(model_kind: str, sync_kind: str, setting: str = "gpu", optimizer_kind: str = "sgd"
                      ) -> str | None:
    """Return why this model cannot train on a GPU here, or None if it can.

    The advice to change the phase's device is given only to ``setting`` gpu: under auto
    the phase already falls back to the CPU, so the line only says why.
    """
    fix = "; use device: cpu or auto" if setting == "gpu" else ""
    if model_kind not in GPU_MODEL_KINDS:
        # A user's Model, trees, GPs and closed-form fits compute with numpy/numba on the host.
        return f"model kind {model_kind} computes on the CPU only (no GPU kernels){fix}"
    if optimizer_kind == "adagrad":
        return f"optimizer kind adagrad keeps its per-coordinate sums on the host only{fix}"
    if sync_kind == "sparse":
        return (f"sync kind sparse gathers touched features on the host only{fix}"
                + (", or sync dense" if fix else "; sync dense would run on the GPU"))
    if model_kind != "mlp" or sync_kind == "exact":
        return None     # exact sync computes each row's factors on the host for every model
    if simulated():
        return "model kind mlp on a gpu phase needs cupy's BLAS, which the CUDA simulator cannot run"
    if not _has_cupy():
        return ("model kind mlp on a gpu phase needs cupy for its matrix products "
                f"(pip install 'fleetmpi[gpu]'){fix + ' for this phase' if fix else ''}")
    return None


def _has_cupy() -> bool:
    import importlib.util
    return importlib.util.find_spec("cupy") is not None


def local_rank(comm: Any) -> tuple[int, int]:
    """Return (this rank's index among the ranks of its node, ranks on the node) (collective)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def choose(comm: Any, phase: str, setting: str, model_kind: str, sync_kind: str, optimizer_kind: str = "sgd"
           ) -> Device:
    """Resolve the phase's device setting on every rank alike (collective); BadInput if gpu cannot be had."""
    if setting == "cpu":
        return Device("cpu", setting)
    refusal = gpu_model_refusal(model_kind, sync_kind, setting, optimizer_kind)
    missing_why = gpu_missing() if refusal is None else None
    # Decide from every rank's view, so that all ranks take the same branch below.
    views = comm.allgather((missing_why, refusal))
    refusals = [why for _, why in views if why is not None]
    if refusals:
        if setting == "gpu":
            raise BadInput(f"fleet.phases.{phase}.device: {refusals[0]}")
        return Device("cpu", setting, why=f"device auto: {refusals[0]}")
    missing = [r for r, (why, _) in enumerate(views) if why is not None]
    if missing:
        where = "this node" if comm.Get_size() == 1 else f"rank(s) {missing}"
        why = views[missing[0]][0]
        if setting == "gpu":
            raise BadInput(f"fleet.phases.{phase}.device is gpu but {where}: {why}; "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; "
                           "use device: auto to fall back to the CPU")
        return Device("cpu", setting, why=f"device auto: {where}: {why}")
    lrank, _ = local_rank(comm)
    index, name = select_gpu(lrank)
    aware, how = cuda_aware_mpi()
    # Every rank must agree: the sync passes device buffers to MPI only if all ranks can.
    aware = all(comm.allgather(aware))
    why = ("device auto: GPU visible; " if setting == "auto" else "") + f"local rank {lrank}; {how}"
    return Device("gpu", setting, index, name, simulated(), aware, why)


def select_gpu(local: int) -> tuple[int, str]:
    """Make GPU ``local % visible`` this process's device; return (its ordinal, its name)."""
    from numba import cuda
    if simulated():
        return 0, "simulator"
    count = len(cuda.gpus)
    index = local % count
    cuda.select_device(index)
    name = cuda.get_current_device().name
    return index, name.decode() if isinstance(name, bytes) else str(name)


def cuda_aware_mpi() -> tuple[bool, str]:
    """Return (whether MPI reads device buffers itself, how that was decided).

    Precedence: FLEETMPI_CUDA_AWARE_MPI=1|0 > MPIX_Query_cuda_support in the loaded MPI
    library (Open MPI, MPICH; mpi4py does not wrap it) > False. Set the variable for an MPI
    whose library name lacks "libmpi" (the lookup scans this process's mapped libraries).
    Under the simulator only the variable can say yes: its device arrays are host memory,
    so that path runs against any MPI (for testing the code path, not the transport).
    """
    env = os.environ.get(CUDA_AWARE_ENV)
    if env in ("0", "1"):
        return env == "1", f"{CUDA_AWARE_ENV}={env}"
    if env:
        raise BadInput(f"{CUDA_AWARE_ENV} must be 0 or 1, got {env!r}")
    if simulated():
        return False, "CUDA simulator: host staging"
    from mpi4py import MPI  # noqa: F401  # loads the MPI library that _mpix_query looks for
    fn = _mpix_query()
    if fn is not None:
        return bool(fn()), "MPIX_Query_cuda_support()"
    return False, "MPI's CUDA support unknown: host staging"


def _mpix_query() -> Any:
    """Return MPIX_Query_cuda_support from the MPI library this process loaded, or None."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libmpi" in line and "/" in line})
    except OSError:
        return None
    for lib in libs:
        try:
            fn = getattr(ctypes.CDLL(lib), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if fn is not None:
            fn.restype = ctypes.c_int
            return fn
    return None


class Placement:
    """Move a phase's arrays between host and device on one stream.

    Device arrays are numba.cuda's (cupy can view them without a copy). Host buffers
    that take part in transfers are pinned (page-locked), so copies are asynchronous DMA
    on the stream; ``sync`` waits for the stream and must precede any MPI call that reads
    a buffer a copy writes.
    """

    def __init__(self) -> None:
        from numba import cuda
        self.cuda = cuda
        self.stream = cuda.stream()

    def to_device(self, host: np.ndarray) -> Any:
        """Return a new device array holding a copy of ``host`` (asynchronous)."""
        return self.cuda.to_device(np.ascontiguousarray(host), stream=self.stream)

    def empty(self, shape: Any, dtype: Any) -> Any:
        return self.cuda.device_array(shape, dtype, stream=self.stream)

    def zeros(self, shape: Any, dtype: Any) -> Any:
        return self.to_device(np.zeros(shape, dtype))

    def pinned(self, shape: Any, dtype: Any) -> np.ndarray:
        """Return an uninitialised page-locked host array."""
        return self.cuda.pinned_array(shape, dtype)

    def upload(self, host: np.ndarray, dev: Any) -> None:
        """Copy ``host`` into device array ``dev`` of the same shape (asynchronous)."""
        dev.copy_to_device(host, stream=self.stream)

    def download(self, dev: Any, host: np.ndarray) -> np.ndarray:
        """Copy device array ``dev`` into ``host`` (asynchronous: ``sync`` before reading it)."""
        dev.copy_to_host(host, stream=self.stream)
        return host

    def sync(self) -> None:
        self.stream.synchronize()


class GpuMonitor:
    """Sample this rank's GPU through NVML (nvidia-ml-py's ``pynvml``) for gpu_util / gpu_mem_util.

    ``sample`` returns (utilisation %, memory used % of total), NaN each when NVML is not
    available; ``missing`` says why not, for the phase's log.
    """

    def __init__(self, device: Device) -> None:
        self._nvml: Any = None
        self._handle: Any = None
        self.missing = ""
        if device.simulated:
            self.missing = "the CUDA simulator has no GPU to sample"
            return
        try:
            import pynvml
        except ImportError:
            self.missing = "nvidia-ml-py (pynvml) is not installed (pip install 'fleetmpi[gpu]')"
            return
        try:
            pynvml.nvmlInit()
            from numba import cuda
            uuid = str(cuda.get_current_device().uuid)
            try:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            self._nvml = pynvml
        except Exception as e:   # NVML errors are plenty (no driver, no permission): report, don't fail
            self.missing = f"NVML failed: {type(e).__name__}: {e}".replace("\n", " ")

    def sample(self) -> np.ndarray:
        """Return [gpu_util %, gpu_mem_util %] of this rank's GPU, NaN where unknown."""
        if self._handle is None:
            return np.array([math.nan, math.nan])
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            return np.array([float(util.gpu), 100.0 * float(mem.used) / float(mem.total)])
        except Exception:
            return np.array([math.nan, math.nan])
