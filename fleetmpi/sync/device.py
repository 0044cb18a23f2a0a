"""Gradient sync of a GPU phase: the phase's host sync kind, on device buffers.

Each class wraps the phase's host ``Sync`` (``fleetmpi.sync``): that object keeps the
kind's settings and the state a checkpoint holds (threshold: residual and tau), so
``gather_state`` / ``load_state`` go through the very code CPU phases use, and a
checkpoint written by a GPU phase is a CPU phase's checkpoint.

MPI sees device buffers only when it is CUDA-aware (``Device.cuda_aware``); otherwise
the buffers cross through pinned host memory. Either way the stream is synchronised
before every MPI call: MPI knows nothing of CUDA streams. Byte accounting is the host
object's own (``Sync._count``; threshold: ``ThresholdSync.exchange_counts`` and ``settle``
are the very calls the host kind makes), so ``payload_bytes`` and ``wire_bytes`` read it.
The extras follow ``fleetmpi.sync.base.Extra``: the kernel writes the loss, the host the rest.

dense      kernel writes [gradient | loss] into the device send buffer; one Allreduce.
threshold  residual, encode and decode on the device (``kernels.gpu``); the packed
           entries (uint32) are allgathered; tau adapts as on the host.
exact      per-row factors and their fixed-point sums on the HOST (``kernels.exact``):
           CUDA's exp/log1p and its fused multiply-adds do not round as the host does,
           and exact means bit for bit the sum a CPU phase would get.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, cast

import numpy as np
from mpi4py import MPI

from fleetmpi.sync.base import Extra, Extras, Sync
from fleetmpi.sync.threshold import ThresholdSync
from kernels import gpu as kg


class Placement(Protocol):
    """What a device sync needs of the engine's placement (``fleetmpi.engine.device.Placement``)."""

    stream: Any

    def empty(self, shape: Any, dtype: Any) -> Any: ...
    def zeros(self, shape: Any, dtype: Any) -> Any: ...
    def pinned(self, shape: Any, dtype: Any) -> np.ndarray: ...
    def upload(self, host: np.ndarray, dev: Any) -> None: ...
    def download(self, dev: Any, host: np.ndarray) -> np.ndarray: ...
    def sync(self) -> None: ...


class DeviceSync:
    """Sum every rank's device gradient; ``out`` is where this rank's kernel writes [grad | loss]."""

    kind = "dense"

    def __init__(self, host: Sync, comm: Any, place: Placement, cuda_aware: bool) -> None:
        self.host, self.comm, self.place, self.cuda_aware = host, comm, place, cuda_aware
        self.size = comm.Get_size()
        self.P, self.E = host.n_params, host.n_extras
        self._tail = place.pinned(self.E - 1, np.float64)   # the extras after Extra.LOSS
        self._setup()

    @property
    def exact(self) -> bool:
        """Return whether the host kind is exact (``Sync.exact``): then rows go to ``reduce_rows``."""
        return self.host.exact

    @property
    def payload_bytes(self) -> int:
        """Return the bytes this rank handed to MPI in the last call (the host sync's count)."""
        return self.host.payload_bytes

    @property
    def wire_bytes(self) -> float:
        """Return the bytes this rank put on the wire in the last call, estimated (the host sync's count)."""
        return self.host.wire_bytes

    def _setup(self) -> None:
        P, E, place = self.P, self.E, self.place
        self._dsend = place.zeros(P + E, np.float64)
        self.out = self._dsend[:P + 1]
        if self.cuda_aware:
            self._drecv = place.empty(P + E, np.float64)
            self._ex = place.pinned(E, np.float64)
        else:
            self._hsend = place.pinned(P + E, np.float64)
            self._hrecv = place.pinned(P + E, np.float64)
            self._dgrad = place.empty(P, np.float64)
        self._wire = 2.0 * (self.size - 1) / self.size * (P + E) * 8

    def reduce(self, rows: int, fp: float, signal: float) -> tuple[Any, np.ndarray]:
        """Return (global gradient sum on the device, global extras on the host); collective.

        Every rank calls it once its kernel filled ``out`` on the placement's stream with
        [gradient sum | loss sum]; ``rows``, ``fp`` and ``signal`` are this rank's other
        extras. The gradient stays valid until the next call.
        """
        P, place = self.P, self.place
        self._tail[:] = Extras(0.0, rows, fp, signal).array()[Extra.LOSS + 1:]
        if self.cuda_aware:
            place.upload(self._tail, self._dsend[P + 1:])
            place.sync()
            self.comm.Allreduce(self._dsend, self._drecv, op=MPI.SUM)
            place.download(self._drecv[P:], self._ex)
            place.sync()
            grad, ex = self._drecv[:P], self._ex
        else:
            place.download(self.out, self._hsend[:P + 1])
            place.sync()
            self._hsend[P + 1:] = self._tail
            self.comm.Allreduce(self._hsend, self._hrecv, op=MPI.SUM)
            place.upload(self._hrecv[:P], self._dgrad)
            grad, ex = self._dgrad, self._hrecv[P:]
        self.host._count((P + self.E) * 8, self._wire)
        return grad, ex.copy()

    def reduce_rows(self, model: Any, X: np.ndarray, y: np.ndarray, params: np.ndarray, fp: float,
                    signal: float) -> tuple[Any, np.ndarray, float]:
        """Return (global gradient sum on the device, global extras, local s) from rows; exact kinds only."""
        raise RuntimeError(f"{self.kind} sync on a GPU phase: a kernel fills out, then reduce(rows, fp, signal)")

    def to_host(self) -> None:
        """Copy device-held sync state into the host sync (before a checkpoint gathers it)."""

    def from_host(self) -> None:
        """Copy the host sync's state (loaded from a checkpoint) to the device."""


class ThresholdDeviceSync(DeviceSync):
    """Threshold sync with residual, encode and decode on the device (see ``sync.threshold``)."""

    kind = "threshold"

    def _setup(self) -> None:
        P, place = self.P, self.place
        self.th = cast(ThresholdSync, self.host)
        self.out = place.zeros(P + 1, np.float64)
        self.residual = place.zeros(P, np.float64)
        self._packed = place.empty(max(P, 1), np.uint32)
        self._scratch = kg.encode_scratch(P, place.stream)
        self._counts = place.zeros(max(P, 1), np.int32)
        self._bad = place.zeros(1, np.int32)
        self._dgrad = place.empty(P, np.float64)
        self._loss = place.pinned(1, np.float64)
        self._hpacked = place.pinned(max(P, 1), np.uint32)
        self._recv_cap = 0
        self.from_host()

    def _recv(self, total: int) -> Any:
        if total > self._recv_cap:
            self._recv_cap = max(total, self.P)
            self._drecv = self.place.empty(self._recv_cap, np.uint32)
            if not self.cuda_aware:
                self._hrecv = self.place.pinned(self._recv_cap, np.uint32)
        return self._drecv[:total]

    def reduce(self, rows: int, fp: float, signal: float) -> tuple[Any, np.ndarray]:
        host, place, P = self.th, self.place, self.P
        tau = host.tau
        place.download(self.out[P:], self._loss)
        m = kg.encode(self.residual, self.out[:P], tau, self._packed, place.stream, self._scratch)  # synchronises
        counts, displs, ex = host.exchange_counts(m, Extras(float(self._loss[0]), rows, fp, signal).array())
        total = int(counts.sum())
        drecv = self._recv(max(total, 1))
        if self.cuda_aware:
            self.comm.Allgatherv([self._packed[:m], MPI.UINT32_T], [drecv, (counts, displs), MPI.UINT32_T])
        else:
            if m:
                place.download(self._packed[:m], self._hpacked[:m])
                place.sync()
            hrecv = self._hrecv[:max(total, 1)]
            self.comm.Allgatherv([self._hpacked[:m], MPI.UINT32_T], [hrecv, (counts, displs), MPI.UINT32_T])
            if total:
                place.upload(hrecv[:total], drecv[:total])
        kg.decode(drecv, total, tau, self._dgrad, self._counts, place.stream, self._bad)   # synchronises
        host.settle(m, total, entry_bytes=4)   # the device packs uint32 entries
        return self._dgrad, ex

    def to_host(self) -> None:
        self.place.download(self.residual, self.th.residual)
        self.place.sync()

    def from_host(self) -> None:
        self.place.upload(np.ascontiguousarray(self.th.residual), self.residual)


class ExactDeviceSync(DeviceSync):
    """Exact sync on the host (see the module docstring); the summed gradient goes to the device."""

    kind = "exact"

    def _setup(self) -> None:
        self.out = None
        self._dgrad = self.place.empty(self.P, np.float64)
        self._hgrad = self.place.pinned(self.P, np.float64)

    def reduce_rows(self, model: Any, X: np.ndarray, y: np.ndarray, params: np.ndarray, fp: float,
                    signal: float) -> tuple[Any, np.ndarray, float]:
        """Return (global gradient sum on the device, global extras, seconds of local work); collective.

        Every rank passes its rows and host ``params`` alike to a CPU phase's exact sync.
        """
        t0 = time.perf_counter()
        loss = self.host.local_grad(model, X, y, params, self.host.grad_out)
        t1 = time.perf_counter()
        g, ex = self.host.reduce(self.host.grad_out, Extras(loss, len(y), fp, signal).array())
        self._hgrad[:] = g
        self.place.upload(self._hgrad, self._dgrad)
        return self._dgrad, ex, t1 - t0

    def reduce(self, rows: int, fp: float, signal: float) -> tuple[Any, np.ndarray]:
        raise RuntimeError("exact sync on a GPU phase: use reduce_rows(model, X, y, params, ...)")


def build_device_sync(host: Sync, comm: Any, place: Placement, cuda_aware: bool) -> DeviceSync:
    """Return the device sync for the phase's host sync object."""
    cls = {"dense": DeviceSync, "threshold": ThresholdDeviceSync, "exact": ExactDeviceSync}[host.kind]
    return cls(host, comm, place, cuda_aware)
