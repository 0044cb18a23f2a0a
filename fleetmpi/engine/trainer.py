"""One rank's training state and the collective operations of a phase.

Every method named for a step or an evaluation is collective: all ranks of ``comm`` call
it in the same order. Rank 0 alone writes files (checkpoints, the model).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fleetmpi.errors import BadInput, TrainingFailed
from fleetmpi.jobdir import JobDir

# Extras summed with the gradient each step: loss sum, row count, batch fingerprint, signal.
N_EXTRAS = 4


class Trainer:
    """State and collective operations of one phase on one rank."""

    device = "cpu"                      # where the phase computes: cpu | gpu (fleetmpi.engine.gpu)
    device_detail = "cpu"               # one line for the log
    notes: tuple[str, ...] = ()         # further lines for the log (rank 0)

    def __init__(self, comm: Any, jd: JobDir) -> None:
        from fleetmpi import spec as specmod
        from fleetmpi.engine import checkpoint
        from fleetmpi.engine.data import RankReader, SampleOrder, contiguous_share, describe
        from fleetmpi.models import build_model, task_of
        from fleetmpi.optim import LBFGS, SGD
        from fleetmpi.sync import build_sync

        self.comm, self.jd = comm, jd
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.spec = specmod.load(jd.spec)
        state = jd.read_state()
        self.phase_name: str = state["phase"]
        if self.phase_name not in self.spec.fleet.phases:
            raise BadInput(f"{jd.state_path}: phase {self.phase_name!r} is not in the spec's fleet.phases")
        self.job_start = float(state.get("created", time.time()))
        sp = self.spec
        task = task_of(sp.model)
        info = _on_root(comm, lambda: describe(sp.data_path(sp.data.train), task, sp.model.classes))
        self.n = info.n
        self.model = build_model(sp.model, info.d, info.classes)
        self.reader = RankReader(sp.data_path(sp.data.train))
        if not self.reader.direct:
            self.notes = (f"{self.reader.path} is chunked or compressed: rows are read by HDF5 hyperslab, several "
                          "times slower at small batches than a contiguous copy (h5repack -f NONE -l CONTI IN OUT)",)
        self.valid_xy: tuple[np.ndarray, np.ndarray] | None
        if sp.data.valid:
            vinfo = _on_root(comm, lambda: describe(sp.data_path(sp.data.valid), task, info.classes))
            if vinfo.d != info.d:
                raise BadInput(f"{vinfo.path}: validation X has {vinfo.d} columns but training X has {info.d}")
            vr = RankReader(sp.data_path(sp.data.valid), direct=False)   # one contiguous read: no map needed
            self.valid_xy = vr.read_contiguous(*contiguous_share(vinfo.n, self.rank, self.size))
            self.n_valid = vinfo.n
            vr.close()
        else:
            self.valid_xy, self.n_valid = None, 0
        self.order = SampleOrder(self.n, sp.optimizer.batch, sp.seed, sp.data.block_rows)
        p = self.model.n_params
        self.mask = self.model.weight_mask()
        self.sync = build_sync(sp.sync, comm, p, N_EXTRAS)
        self.grad = self.sync.grad_out   # kernels write into the sync's send buffer
        self.sgd = SGD(sp.optimizer, p)
        self.lbfgs = LBFGS(sp.optimizer.lbfgs, p)
        self.lbfgs_data: tuple[np.ndarray, np.ndarray, float, int] | None = None

        # Resume from the newest valid checkpoint, or start fresh.
        found = _on_root(comm, lambda: checkpoint.latest_valid(jd.ckpt))
        ckpt, skipped = found
        self.skipped = [(str(path), why) for path, why in skipped]
        self.resumed_from = str(ckpt.path) if ckpt else None
        if ckpt is not None:
            checkpoint.check_compatible(ckpt, sp.model_hash())
            meta = ckpt.meta
            self.params = np.array(ckpt.arrays["params"], dtype=np.float64)
            if self.params.shape != (p,):
                raise BadInput(f"{ckpt.path}: params have shape {self.params.shape} but the model needs ({p},)")
            self.step, self.cursor = int(meta["step"]), int(meta["cursor"])
            self.samples_seen = int(meta["samples_seen"])
            self.optimizer = str(meta["optimizer"])
            self.fired = set(meta.get("fired", []))
            self.carried = dict(meta.get("summary", {}))
            self.sgd.load_state(ckpt.arrays)
            self.lbfgs.load_state(ckpt.arrays)
            self.sync.load_state(ckpt.arrays)
        else:
            self.params = self.model.init(np.random.default_rng([sp.seed, 0x1417]), sp.model.init_scale)
            self.step = self.cursor = self.samples_seen = 0
            self.optimizer = sp.optimizer.kind
            self.fired = set()
            self.carried = {}
        self.stop_signal = 0
        self._util_mark = (time.perf_counter(), time.process_time())
        self.pending: dict[str, Any] | None = state.get("pending_approval")
        self.phase_index = len(state.get("phases_run", []))

    # -- one step ---------------------------------------------------------------------------
    def sgd_step(self) -> dict[str, Any]:
        B = self.spec.optimizer.batch
        start, stop = self.order.share(self.step, self.rank, self.size)
        X, y, fp = self.reader.read(self.order.ranges(start, stop))
        t0 = time.perf_counter()
        loss_sum = self.sync.local_grad(self.model, X, y, self.params, self.grad)
        t1 = time.perf_counter()
        g, ex = self.sync.reduce(self.grad, np.array([loss_sum, len(y), fp, self.stop_signal]))
        t2 = time.perf_counter()
        grad = g / B
        if self.model.l2:
            grad += self.model.l2 * self.mask * self.params
        lr = self.sgd.step(self.params, grad, self.step)
        rec = {"loss": ex[0] / B, "lr": lr, "samples": int(ex[1]), "batch_fp": ex[2], "cursor": self.cursor,
               "compute_s": t1 - t0, "comm_s": t2 - t1, "payload_bytes": self.sync.payload_bytes,
               "wire_bytes": self.sync.wire_bytes, "signal": ex[3]}
        self.cursor += B
        self.samples_seen += B
        return rec

    def _lbfgs_rows(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        if self.lbfgs_data is None:
            from fleetmpi.engine.data import contiguous_share
            batch = self.spec.optimizer.lbfgs.batch
            if batch == "full" or batch >= self.n:
                lo, hi = contiguous_share(self.n, self.rank, self.size)
                X, y = self.reader.read_contiguous(lo, hi)
                from fleetmpi.engine.data import row_fingerprint
                self.lbfgs_data = (X, y, row_fingerprint(lo, hi), self.n)
            else:
                # A fixed batch: the first ``batch`` positions of epoch 0's order.
                order = type(self.order)(self.n, batch, self.spec.seed, self.spec.data.block_rows)
                X, y, fp = self.reader.read(order.ranges(*order.share(0, self.rank, self.size)))
                self.lbfgs_data = (X.copy(), y.copy(), fp, int(batch))
        return self.lbfgs_data

    def _global_grad(self, w: np.ndarray, data: tuple[np.ndarray, np.ndarray, float, int]
                     ) -> tuple[np.ndarray, np.ndarray, float, float, int, float]:
        """Return (gradient sum over all ranks, extras sum, compute s, comm s, payload B, wire B) at w.

        Collective: one evaluation of the L-BFGS objective's data term on this rank's rows.
        """
        X, y, fp, _ = data
        t0 = time.perf_counter()
        loss_sum = self.sync.local_grad(self.model, X, y, w, self.grad)
        t1 = time.perf_counter()
        g, ex = self.sync.reduce(self.grad, np.array([loss_sum, len(y), fp, self.stop_signal]))
        return g, ex, t1 - t0, time.perf_counter() - t1, self.sync.payload_bytes, self.sync.wire_bytes

    def lbfgs_step(self) -> dict[str, Any]:
        data = self._lbfgs_rows()
        fp, N = data[2], data[3]
        acc: dict[str, float] = {"compute_s": 0.0, "comm_s": 0.0, "payload": 0, "wire": 0.0, "signal": 0.0,
                                 "evals": 0}

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            g, ex, compute_s, comm_s, payload, wire = self._global_grad(w, data)
            acc["compute_s"] += compute_s
            acc["comm_s"] += comm_s
            acc["payload"] += payload
            acc["wire"] += wire
            acc["signal"] = max(acc["signal"], ex[3])
            acc["evals"] += 1
            grad = g / N
            loss = ex[0] / N
            if self.model.l2:
                grad = grad + self.model.l2 * self.mask * w
                loss += 0.5 * self.model.l2 * float(np.sum(self.mask * w * w))
            return loss, grad.copy()

        loss, _moved = self.lbfgs.step(self.params, objective)
        evals = int(acc["evals"])
        self.samples_seen += evals * N
        return {"loss": loss, "lr": self.lbfgs.last_step, "samples": evals * N, "batch_fp": fp,
                "cursor": self.cursor, "compute_s": acc["compute_s"], "comm_s": acc["comm_s"],
                "payload_bytes": acc["payload"], "wire_bytes": acc["wire"], "signal": acc["signal"]}

    # -- collectives at evaluation points ---------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Return validation loss/accuracy (collective; empty without validation data)."""
        from mpi4py import MPI
        if self.valid_xy is None:
            return {}
        X, y = self.valid_xy
        loss, correct = self.model.eval_sums(X, y, self.params) if len(y) else (0.0, 0.0)
        tot = np.empty(2)
        self.comm.Allreduce(np.array([loss, correct]), tot, op=MPI.SUM)
        out = {"valid_loss": tot[0] / self.n_valid}
        if self.model.task != "regression":
            out["valid_accuracy"] = tot[1] / self.n_valid
        return out

    def utilisation(self, proc: Any) -> dict[str, float]:
        """Return mean CPU % of the ranks since the last call and their memory as % of host RAM."""
        import psutil
        # process_time has ns resolution; psutil's cpu_percent rounds to scheduler ticks,
        # which reads 0 or 200 % over the few milliseconds between evaluation points.
        now, cpu = time.perf_counter(), time.process_time()
        last_now, last_cpu = self._util_mark
        self._util_mark = (now, cpu)
        pct = 100.0 * (cpu - last_cpu) / max(now - last_now, 1e-9)
        mine = np.array([pct, float(proc.memory_info().rss)])
        allr = np.empty((self.size, 2)) if self.rank == 0 else None
        self.comm.Gather(mine, allr, root=0)
        if allr is None:
            return {}
        total = psutil.virtual_memory().total
        return {"cpu_util": float(allr[:, 0].mean()), "mem_util": float(100.0 * allr[:, 1].sum() / total)}

    def checkpoint(self, reason: str, summary: dict[str, Any]) -> None:
        """Write a checkpoint of the global state (collective; rank 0 writes)."""
        from mpi4py import MPI

        from fleetmpi.engine import checkpoint
        # Every rank must hold the same parameters; check before trusting rank 0's copy.
        probe = np.array([float(self.params.sum()), float(np.dot(self.params, self.params))])
        lo, hi = np.empty(2), np.empty(2)
        self.comm.Allreduce(probe, lo, op=MPI.MIN)
        self.comm.Allreduce(probe, hi, op=MPI.MAX)
        if not np.array_equal(lo, hi):
            raise TrainingFailed(f"ranks hold different parameters at step {self.step}; refusing to checkpoint")
        extra = self.sync.gather_state()
        if self.rank == 0:
            arrays = {"params": self.params, **self.sgd.state(), **self.lbfgs.state(), **extra}
            meta = {"step": self.step, "cursor": self.cursor, "samples_seen": self.samples_seen,
                    "epoch": self.samples_seen / self.n, "optimizer": self.optimizer, "phase": self.phase_name,
                    "fired": sorted(self.fired), "spec_hash": self.spec.spec_hash(),
                    "model_hash": self.spec.model_hash(), "model": self.model.meta(),
                    "rng": {"order": "numpy default_rng([seed, epoch]).permutation(blocks)",
                            "seed": self.spec.seed, "block_rows": self.order.block_rows},
                    "ranks": self.size, "reason": reason, "summary": summary}
            path = checkpoint.save(self.jd.ckpt, self.step, arrays, meta, self.spec.checkpoint.keep)
            self.jd.event("checkpoint", step=self.step, path=str(path), reason=reason)
        self.comm.Barrier()

    def write_model(self, metrics: dict[str, Any]) -> None:
        from fleetmpi.h5store import write_h5_atomic
        meta = {**self.model.meta(), "name": self.spec.name, "step": self.step,
                "epoch": self.samples_seen / self.n, "spec_hash": self.spec.spec_hash(),
                "model_hash": self.spec.model_hash(), "metrics": metrics}
        write_h5_atomic(self.jd.model, {"params": self.params}, meta, kind="model")


def open_trainer(comm: Any, jd: JobDir) -> Trainer:
    """Return this rank's trainer for the job's phase on the device the phase asks for (collective).

    ``device: gpu`` or ``auto`` resolve through ``fleetmpi.engine.device.choose`` (every rank
    alike); a GPU phase gets a ``GpuTrainer``, which imports numba.cuda only then.
    """
    from fleetmpi import spec as specmod
    from fleetmpi.engine import device
    sp = specmod.load(jd.spec)
    phase = str(jd.read_state().get("phase"))
    setting = sp.fleet.phases[phase].device if phase in sp.fleet.phases else "cpu"
    dev = device.choose(comm, str(phase), setting, sp.model.kind, sp.sync.kind)
    if dev.kind == "gpu":
        from fleetmpi.engine.gpu import GpuTrainer
        return GpuTrainer(comm, jd, dev)
    t = Trainer(comm, jd)
    t.device_detail = dev.describe()
    return t


def _on_root(comm: Any, fn: Any) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result or its BadInput to every rank."""
    result: Any = None
    err: str | None = None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except BadInput as e:
            err = str(e)
    result, err = comm.bcast((result, err), root=0)
    if err is not None:
        raise BadInput(err)
    return result
