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
written here resumes a CPU phase and the other way round. The SGD and L-BFGS techniques
(``fleetmpi.engine.gradient``) are the CPU phase's; ``GpuFlatState`` supplies their
device hooks.
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np

from fleetmpi.engine.data import RankReader
from fleetmpi.engine.device import Device, GpuMonitor, Placement
from fleetmpi.engine.gradient import FlatState, Reduced, Rows
from fleetmpi.engine.h5rows import Ranges
from fleetmpi.engine.trainer import Trainer
from fleetmpi.jobdir import JobDir
from fleetmpi.models.gpu import GpuModel
from fleetmpi.spec import Spec
from fleetmpi.sync.device import build_device_sync
from kernels import gpu as kg


class PinnedReader(RankReader):
    """A RankReader with two pinned batch slots: one is copied to the device while the host fills the other."""

    def __init__(self, path: Any, rows: int, place: Placement) -> None:
        super().__init__(path)
        self._slots = [(place.pinned((rows, self.d), np.float32), place.pinned(rows, np.float32)) for _ in range(2)]

    def read(self, ranges: Ranges, slot: int | None = None, *,
             threads: bool | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Read into pinned slot 0 or 1 (views valid until that slot is read again); None: unpinned buffers."""
        if slot is None:
            return super().read(ranges, threads=threads)
        own = self._xbuf, self._ybuf
        self._xbuf, self._ybuf = self._slots[slot]
        try:
            return super().read(ranges, threads=threads)
        finally:
            self._slots[slot] = (self._xbuf, self._ybuf)
            self._xbuf, self._ybuf = own


class GpuTrainer(Trainer):
    """A phase on one rank computing on a GPU: pinned reads, device state, NVML utilisation."""

    device = "gpu"

    def __init__(self, comm: Any, jd: JobDir, spec: Spec, state: dict[str, Any], dev: Device) -> None:
        """Take the rank's GPU, then open the phase as a CPU phase would, on device state (collective)."""
        self.dev = dev
        self.place = Placement()
        self.rows = -(-spec.optimizer.batch // comm.Get_size())   # the largest share of a global batch
        self.flat_state_class = GpuFlatState
        super().__init__(comm, jd, spec, state, dev.describe())
        self.gpu_monitor = GpuMonitor(dev)
        missing = comm.gather(self.gpu_monitor.missing, root=0)
        if self.rank == 0:
            self.notes += _nvml_notes(missing)
        self.place.sync()

    def _open_reader(self, path: Any) -> PinnedReader:
        # L-BFGS's rows come through it too (unpinned buffers).
        return PinnedReader(path, self.rows, self.place)

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


class GpuFlatState(FlatState):
    """The gradient techniques' state with parameters and SGD velocity in device memory.

    The host arrays (``params``, ``sgd.velocity``, the sync's residual) are what a
    checkpoint, an evaluation, the model file and L-BFGS read: ``to_host`` refreshes
    them, ``from_host`` hands them back.
    """

    def __init__(self, run: Trainer) -> None:
        super().__init__(run)
        self.gpu_run = cast(GpuTrainer, run)   # flat_state_class is set by GpuTrainer alone
        run = self.gpu_run
        self.place = place = run.place
        p = self.n_params
        self.dsync = build_device_sync(self.sync, run.comm, place, run.dev.cuda_aware)
        self.gmodel = GpuModel(self.model, place, run.rows)     # scratch is allocated on first use
        self.dparams = place.to_device(self.params)
        self.dvelocity = place.to_device(self.sgd.velocity)
        self.dmask = place.to_device(self.mask)
        self._hparams = place.pinned(p, np.float64)
        self._hgrad = place.pinned(p, np.float64)
        self._dw = place.empty(p, np.float64)
        self._on_host = True            # self.params / self.sgd.velocity equal the device copies
        self.dX = place.empty((run.rows, run.reader.d), np.float32)
        self.dy = place.empty(run.rows, np.float32)
        self._slot = 0
        self._ahead: tuple[tuple[int, int], np.ndarray, np.ndarray, float, int] | None = None
        self._lbfgs_dev: tuple[np.ndarray, Any, Any] | None = None

    # -- host <-> device state --------------------------------------------------------------
    def to_host(self) -> None:
        if not self._on_host:
            self.place.download(self.dparams, self.params)
            self.place.download(self.dvelocity, self.sgd.velocity)
            self.place.sync()
            self._on_host = True

    def from_host(self) -> None:
        # The velocity is uploaded too: after a load it is new; after L-BFGS it is unchanged.
        self.place.upload(np.ascontiguousarray(self.params), self.dparams)
        self.place.upload(np.ascontiguousarray(self.sgd.velocity), self.dvelocity)

    def state(self) -> dict[str, np.ndarray]:
        self.to_host()
        self.dsync.to_host()
        return super().state()

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state(arrays)
        self.dsync.from_host()

    # -- batches ----------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Return this rank's rows of ``step`` (read ahead during the last step, or read now)."""
        run = self.gpu_run
        share = run.order.share(step, run.rank, run.size)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == share:
            _, X, y, fp, self._slot = ahead
            return X, y, fp
        # The last step's stream was synchronised: no copy reads either slot now.
        self._slot = 1 - self._slot
        return run.reader.read(run.order.bounds(*share), self._slot)

    def _read_ahead(self, step: int) -> None:
        """Read ``step``'s rows into the slot the current copy does not use."""
        run = self.gpu_run
        share = run.order.share(step, run.rank, run.size)
        slot = 1 - self._slot
        X, y, fp = run.reader.read(run.order.bounds(*share), slot)
        self._ahead = (share, X, y, fp, slot)

    # -- steps ------------------------------------------------------------------------------
    def sgd_gradient(self) -> Reduced:
        run, place = self.gpu_run, self.place
        X, y, fp = self._batch(run.step)
        t0 = time.perf_counter()
        if self.dsync.exact:
            # Each row's factors on the host, from the pinned batch: bitwise a CPU phase's sum.
            place.download(self.dparams, self._hparams)
            place.sync()
            g, ex, local_s = self.dsync.reduce_rows(self.model, X, y, self._hparams, fp, run.stop_signal)
            t1, t2 = t0 + local_s, time.perf_counter()
            self._read_ahead(run.step + 1)
        else:
            self.gmodel.check(y)
            n = len(y)
            dX, dy = self.dX[:n], self.dy[:n]
            place.upload(X, dX)
            place.upload(y, dy)
            self.gmodel.grad(dX, dy, self.dparams, self.dsync.out)
            self._read_ahead(run.step + 1)     # overlaps the device's work
            place.sync()
            t1 = time.perf_counter()
            g, ex = self.dsync.reduce(n, fp, run.stop_signal)
            t2 = time.perf_counter()
        return g, ex, t1 - t0, t2 - t1

    def sgd_apply(self, g: Any, lr: float) -> None:
        sp = self.run.spec
        kg.sgd_update(self.dparams, self.dvelocity, g, self.dmask, sp.optimizer.batch, self.model.l2, lr,
                      sp.optimizer.momentum, self.place.stream)
        self._on_host = False

    def global_grad(self, w: np.ndarray, data: Rows) -> Reduced:
        if self.dsync.exact:
            return super().global_grad(w, data)   # exact: on the host, as a CPU phase does it
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
        g_dev, ex = self.dsync.reduce(len(y), fp, self.run.stop_signal)
        g = self.place.download(g_dev, self._hgrad)
        self.place.sync()
        return g, ex, t1 - t0, time.perf_counter() - t1


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
