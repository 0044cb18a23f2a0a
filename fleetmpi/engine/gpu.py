"""One rank's training state on a GPU: parameters and SGD velocity live in device memory.

An SGD step (dense / threshold sync):

1. the rank's rows of the batch wait in a pinned (page-locked) host slot, read from HDF5
   during the previous step;
2. asynchronous copies on the phase's stream move them to the device, and the gradient
   kernel writes [gradient sum | loss sum] into the device sync's buffer;
3. while the device works, the host reads the NEXT step's rows into the other slot;
4. the stream is synchronised, then the ranks sync (``fleetmpi.sync.device``: device
   buffers if MPI is CUDA-aware, pinned host buffers otherwise);
5. the SGD update runs on the device with numpy's rounding (``kernels.gpu.sgd_update``).

exact sync: each row's gradient factors and their fixed-point sum are computed on the
host (``kernels.exact``, the code CPU phases run) from the pinned batch and a copy of the
parameters; only the update runs on the device, so the result is bitwise a CPU phase's.

L-BFGS keeps its history and line search on the host (a few vectors of n_params); each
objective's gradient is computed on the device over its rows, copied there once.
Evaluation runs on the host from a copy of the parameters (validation is small and rare).
Checkpoints and the model hold host float64 arrays, copied back first: a checkpoint
written here resumes a CPU phase and the other way round.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fleetmpi.engine.data import RankReader
from fleetmpi.engine.device import Device, GpuMonitor, Placement
from fleetmpi.engine.trainer import Trainer
from fleetmpi.jobdir import JobDir
from fleetmpi.models.gpu import GpuModel
from fleetmpi.sync.device import ExactDeviceSync, build_device_sync
from kernels import gpu as kg


class PinnedReader(RankReader):
    """A RankReader with two pinned batch slots: one is copied to the device while the host fills the other."""

    def __init__(self, path: Any, rows: int, place: Placement) -> None:
        super().__init__(path)
        self._slots = [(place.pinned((rows, self.d), np.float32), place.pinned(rows, np.float32)) for _ in range(2)]

    def read(self, ranges: list[tuple[int, int]], slot: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Read into pinned slot 0 or 1 (views valid until that slot is read again); None: unpinned buffers."""
        if slot is None:
            return super().read(ranges)
        own = self._xbuf, self._ybuf
        self._xbuf, self._ybuf = self._slots[slot]
        try:
            return super().read(ranges)
        finally:
            self._slots[slot] = (self._xbuf, self._ybuf)
            self._xbuf, self._ybuf = own


class GpuTrainer(Trainer):
    """State and collective operations of one phase on one rank, computing on a GPU."""

    device = "gpu"

    def __init__(self, comm: Any, jd: JobDir, dev: Device) -> None:
        super().__init__(comm, jd)
        self.dev = dev
        self.device_detail = dev.describe()
        self.place = place = Placement()
        sp = self.spec
        p = self.model.n_params
        self.exact = self.sync.kind == "exact"
        rows = -(-sp.optimizer.batch // self.size)      # the largest share of a global batch
        self.dsync = build_device_sync(self.sync, comm, place, dev.cuda_aware)
        self.gmodel = GpuModel(self.model, place, rows)     # scratch is allocated on first use
        self.dparams = place.to_device(self.params)
        self.dvelocity = place.to_device(self.sgd.velocity)
        self.dmask = place.to_device(self.mask)
        self._hparams = place.pinned(p, np.float64)
        self._hgrad = place.pinned(p, np.float64)
        self._dw = place.empty(p, np.float64)
        self._on_host = True            # self.params / self.sgd.velocity equal the device copies
        self.reader.close()
        self.pinned_reader = PinnedReader(sp.data_path(sp.data.train), rows, place)
        self.reader = self.pinned_reader          # L-BFGS's rows come through it too (unpinned buffers)
        self.dX = place.empty((rows, self.reader.d), np.float32)
        self.dy = place.empty(rows, np.float32)
        self._slot = 0
        self._ahead: tuple[tuple[int, int], np.ndarray, np.ndarray, float, int] | None = None
        self._lbfgs_dev: tuple[np.ndarray, Any, Any] | None = None
        self.gpu_monitor = GpuMonitor(dev)
        missing = comm.gather(self.gpu_monitor.missing, root=0)
        if self.rank == 0:
            self.notes += _nvml_notes(missing)
        place.sync()

    # -- host <-> device state --------------------------------------------------------------
    def _pull(self) -> None:
        """Copy device parameters and velocity into the host arrays a checkpoint or evaluation reads."""
        if not self._on_host:
            self.place.download(self.dparams, self.params)
            self.place.download(self.dvelocity, self.sgd.velocity)
            self.place.sync()
            self._on_host = True

    def _push(self) -> None:
        """Copy host parameters (after an L-BFGS step) to the device."""
        self.place.upload(np.ascontiguousarray(self.params), self.dparams)

    # -- batches ----------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Return this rank's rows of ``step`` (read ahead during the last step, or read now)."""
        share = self.order.share(step, self.rank, self.size)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == share:
            _, X, y, fp, self._slot = ahead
            return X, y, fp
        # The last step's stream was synchronised: no copy reads either slot now.
        self._slot = 1 - self._slot
        return self.pinned_reader.read(self.order.ranges(*share), self._slot)

    def _read_ahead(self, step: int) -> None:
        """Read ``step``'s rows into the slot the current copy does not use."""
        share = self.order.share(step, self.rank, self.size)
        slot = 1 - self._slot
        X, y, fp = self.pinned_reader.read(self.order.ranges(*share), slot)
        self._ahead = (share, X, y, fp, slot)

    # -- one step ---------------------------------------------------------------------------
    def sgd_step(self) -> dict[str, Any]:
        sp, place = self.spec, self.place
        B = sp.optimizer.batch
        X, y, fp = self._batch(self.step)
        t0 = time.perf_counter()
        if isinstance(self.dsync, ExactDeviceSync):
            # Each row's factors on the host, from the pinned batch: bitwise a CPU phase's sum.
            place.download(self.dparams, self._hparams)
            place.sync()
            g, ex, local_s = self.dsync.reduce_rows(self.model, X, y, self._hparams, fp, self.stop_signal)
            t1, t2 = t0 + local_s, time.perf_counter()
            self._read_ahead(self.step + 1)
        else:
            self.gmodel.check(y)
            n = len(y)
            dX, dy = self.dX[:n], self.dy[:n]
            place.upload(X, dX)
            place.upload(y, dy)
            self.gmodel.grad(dX, dy, self.dparams, self.dsync.out)
            self._read_ahead(self.step + 1)     # overlaps the device's work
            place.sync()
            t1 = time.perf_counter()
            g, ex = self.dsync.reduce(n, fp, self.stop_signal)
            t2 = time.perf_counter()
        lr = self.sgd.lr(self.step)
        kg.sgd_update(self.dparams, self.dvelocity, g, self.dmask, B, self.model.l2, lr, sp.optimizer.momentum,
                      place.stream)
        self._on_host = False
        rec = {"loss": ex[0] / B, "lr": lr, "samples": int(ex[1]), "batch_fp": ex[2], "cursor": self.cursor,
               "compute_s": t1 - t0, "comm_s": t2 - t1, "payload_bytes": self.dsync.payload_bytes,
               "wire_bytes": self.dsync.wire_bytes, "signal": ex[3]}
        self.cursor += B
        self.samples_seen += B
        return rec

    def lbfgs_step(self) -> dict[str, Any]:
        # L-BFGS history and line search stay on the host (Trainer.lbfgs_step); each
        # objective evaluation runs on the device through _global_grad.
        self._pull()
        rec = super().lbfgs_step()
        self._push()
        return rec

    def _global_grad(self, w: np.ndarray, data: tuple[np.ndarray, np.ndarray, float, int]
                     ) -> tuple[np.ndarray, np.ndarray, float, float, int, float]:
        if self.exact:
            return super()._global_grad(w, data)   # exact: on the host, as a CPU phase does it
        X, y, fp, _ = data
        if self._lbfgs_dev is None or self._lbfgs_dev[0] is not X:
            self.gmodel.check(y)
            self._lbfgs_dev = (X, self.place.to_device(X), self.place.to_device(y))
        _, dX, dy = self._lbfgs_dev
        t0 = time.perf_counter()
        self.place.upload(np.ascontiguousarray(w), self._dw)
        self.gmodel.grad(dX, dy, self._dw, self.dsync.out)
        self.place.sync()
        t1 = time.perf_counter()
        g_dev, ex = self.dsync.reduce(len(y), fp, self.stop_signal)
        g = self.place.download(g_dev, self._hgrad)
        self.place.sync()
        return g, ex, t1 - t0, time.perf_counter() - t1, self.dsync.payload_bytes, self.dsync.wire_bytes

    def evaluate(self) -> dict[str, float]:
        self._pull()
        return super().evaluate()

    def utilisation(self, proc: Any) -> dict[str, float]:
        """Return the CPU metrics plus gpu_util / gpu_mem_util: means over the ranks NVML could sample."""
        out = super().utilisation(proc)
        mine = self.gpu_monitor.sample()
        every = np.empty((self.size, 2)) if self.rank == 0 else None
        self.comm.Gather(mine, every, root=0)
        if every is not None:
            for col, name in enumerate(("gpu_util", "gpu_mem_util")):
                vals = every[:, col][np.isfinite(every[:, col])]
                if vals.size:
                    out[name] = float(vals.mean())
        return out

    def checkpoint(self, reason: str, summary: dict[str, Any]) -> None:
        self._pull()
        self.dsync.to_host()
        super().checkpoint(reason, summary)

    def write_model(self, metrics: dict[str, Any]) -> None:
        self._pull()
        super().write_model(metrics)


def _nvml_notes(missing: list[str]) -> tuple[str, ...]:
    """Return the log line saying why gpu_util / gpu_mem_util are missing (none if every rank has NVML)."""
    gone = [(r, why) for r, why in enumerate(missing) if why]
    if not gone:
        return ()
    reasons = sorted({why for _, why in gone})
    if len(gone) == len(missing):
        return (f"gpu_util and gpu_mem_util are not measured ({'; '.join(reasons)}); rules on them never fire",)
    ranks = [r for r, _ in gone]
    return (f"gpu_util and gpu_mem_util average only the ranks NVML can sample; rank(s) {ranks}: "
            f"{'; '.join(reasons)}",)
