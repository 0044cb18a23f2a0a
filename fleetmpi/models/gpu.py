"""A model's gradient on device arrays: one asynchronous call per step, CPU models untouched.

``GpuModel`` wraps a host ``Model`` (which keeps its meaning: init, masks, predictions
and evaluation stay on the host) and launches the matching ``kernels.gpu`` kernel on
the phase's stream. Every kernel writes [gradient sum | loss sum] into one float64
device vector of ``n_params + 1``, the dense sync's send layout.

linear, logistic, softmax: numba.cuda fused kernels (run under the CUDA simulator too).
mlp: cupy's BLAS on views of the device arrays, only where cupy is installed and a real
GPU is present; the engine refuses it elsewhere, before any rank starts. The engine hands
in where arrays live (its placement): a model does not choose its device. (Exact sync
computes every model's per-row factors on the host, so it needs
no GpuModel.)
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fleetmpi.models.base import Model
from kernels import gpu as kg
from kernels import gpu_mlp


class Placement(Protocol):
    """What a GPU model needs of the placement the engine hands in (its stream and scratch)."""

    stream: Any

    def empty(self, shape: Any, dtype: Any) -> Any: ...


class GpuModel:
    """Launch ``model``'s gradient kernel on device arrays, with scratch reused between steps."""

    def __init__(self, model: Model, place: Placement, rows: int) -> None:
        if model.kind not in ("linear", "logistic", "softmax", "mlp"):
            raise ValueError(f"model kind {model.kind!r} has no GPU gradient")
        self.model, self.place = model, place
        self.kind = model.kind
        self.n_params = model.n_params
        self.k = int(getattr(model, "k", 2))
        self._rows = 0
        self._part: Any = None
        self._resid: Any = None
        self._want = rows

    def _reserve(self, rows: int) -> None:
        """Size the scratch for batches of up to ``rows`` rows."""
        if rows <= self._rows:
            return
        self._rows = rows
        if self.kind != "mlp":
            self._part = kg.partials(rows, self.n_params, self.place.stream)
        if self.kind == "softmax":
            self._resid = self.place.empty((max(rows, 1), self.k), np.float64)

    def check(self, y: np.ndarray) -> None:
        """Refuse labels the kernels would index out of range (the host copy of the batch: no sync)."""
        if self.kind == "logistic":
            self.model.check_labels(y, 2)
        elif self.kind in ("softmax", "mlp"):
            self.model.check_labels(y, self.k)

    def grad(self, X: Any, y: Any, params: Any, out: Any) -> None:
        """Fill device ``out`` (n_params + 1,) with [gradient sum | loss sum] over X's rows (asynchronous)."""
        n = X.shape[0]
        self._reserve(max(n, self._want))
        stream = self.place.stream
        if self.kind == "linear":
            kg.linear_grad(X, y, params, out, self._part, stream)
        elif self.kind == "logistic":
            kg.logistic_grad(X, y, params, out, self._part, stream)
        elif self.kind == "softmax":
            kg.softmax_grad(X, y, params, self.k, out, self._part, self._resid, stream)
        else:
            self._mlp(X, y, params, out)

    def _mlp(self, X: Any, y: Any, params: Any, out: Any) -> None:
        import cupy as cp
        # cupy views the numba arrays through __cuda_array_interface__ (no copy) and runs on
        # the phase's stream, so its work is ordered with the copies and kernels around it.
        # int(stream) is the CUstream pointer under both of numba's driver bindings (ctypes,
        # where .handle is a c_void_p, and cuda-python, where it is a CUstream object).
        # cp.asarray waits on the stream the numba arrays name (CUDA array interface v3):
        # the same stream cupy then runs on, so it costs a host wait for the batch copy,
        # which the kernels would wait for anyway; the read-ahead still overlaps them.
        with cp.cuda.ExternalStream(int(self.place.stream)):   # type: ignore[call-overload]
            gpu_mlp.mlp_grad_xp(cp, cp.asarray(X), cp.asarray(y), cp.asarray(params),
                           tuple(self.model.sizes), cp.asarray(out))   # type: ignore[attr-defined]
