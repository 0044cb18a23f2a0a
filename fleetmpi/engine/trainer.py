"""One rank's training state and the collective operations of a phase.

Every method named for a step or an evaluation is collective: all ranks of ``comm`` call
it in the same order. Rank 0 alone writes files (checkpoints, the model).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np

from fleetmpi.engine.gradient import FlatState
from fleetmpi.engine.technique import MODEL_TECHNIQUES, StepRecord, Technique, technique_class
from fleetmpi.errors import BadInput, CheckpointError, DiskFull, disk_full
from fleetmpi.jobdir import JobDir
from fleetmpi.spec import Spec

T = TypeVar("T")

# Model kinds with CSR kernels (kernels.sparse); the others need dense X.
SPARSE_MODEL_KINDS = ("linear", "logistic", "softmax")


class Trainer:
    """State and collective operations of one phase on one rank; the technique in use steps it."""

    device = "cpu"                      # where the phase computes: cpu | gpu (fleetmpi.engine.gpu)
    device_detail = "cpu"               # one line for the log
    notes: tuple[str, ...] = ()         # further lines for the log (rank 0)
    flat_state_class: type[FlatState] = FlatState   # the gradient techniques' state on this device

    def __init__(self, comm: Any, jd: JobDir, spec: Spec, state: dict[str, Any], device_detail: str = "cpu",
                 ready: Callable[[], dict[str, Any]] | None = None) -> None:
        """Open the phase's data and resume from the newest valid checkpoint or start fresh (collective).

        ``ready`` (a pre-started phase, :mod:`fleetmpi.engine.standby`): called collectively
        once the data is open and the model's kernels are loaded; it waits until the previous
        phase has ended and returns the job's state then, which this trainer goes on from
        (``state`` need only name the phase). It raises to give up: nothing was read of the
        job's checkpoints or written yet.
        """
        self.comm, self.jd, self.spec = comm, jd, spec
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.device_detail = device_detail
        self.phase_name: str = state["phase"]
        if self.phase_name not in spec.fleet.phases:
            raise BadInput(f"{jd.state_path}: phase {self.phase_name!r} is not in the spec's fleet.phases")
        self.stop_signal = 0
        self.checkpointed_step: int | None = None   # the step of this phase's last checkpoint
        self._shared: dict[str, Any] = {}
        self._techniques: dict[str, Technique] = {}
        self._open_data()
        self.kernels_warmed = False
        if ready is not None:
            self.kernels_warmed = self.warm_kernels()
            gc_after_startup()   # before a wait that may last a whole phase
            state = ready()
            if state.get("phase") != self.phase_name:   # the launcher says go only to the phase it named
                raise BadInput(f"{jd.state_path}: the job moved to phase {state.get('phase')!r}, "
                               f"not the pre-started {self.phase_name!r}")
        self.job_start = float(state.get("created", time.time()))
        self.pending: dict[str, Any] | None = state.get("pending_approval")
        self._util_mark = (time.perf_counter(), time.process_time())
        from fleetmpi.engine import checkpoint
        ckpt, skipped = _on_root(comm, lambda: checkpoint.latest_valid(jd.ckpt))
        self.skipped = [(str(path), why) for path, why in skipped]
        self.resumed_from = str(ckpt.path) if ckpt else None
        if ckpt is not None:
            self._resume(ckpt)
        else:
            self._fresh()

    def _open_data(self) -> None:
        """Describe the training data on rank 0, open this rank's reader and its validation rows."""
        from fleetmpi.engine.data import SampleOrder, describe, open_reader
        from fleetmpi.engine.h5rows import contiguous_share
        from fleetmpi.models import task_of
        sp, comm = self.spec, self.comm
        if sp.lags is not None:   # series data: lag windows are the samples
            from fleetmpi.engine.windows import open_windows
            open_windows(self, _on_root)
            return
        self.task = task = task_of(sp.model)
        # The pre-flight (fleetmpi.preflight) scanned the files for NaN/inf once; phases do not repeat it.
        info = _on_root(comm, lambda: describe(sp.data_path(sp.data.train), task, sp.model.classes, check=False))
        self.n, self.d, self.classes = info.n, info.d, info.classes
        self.reader = self._open_reader(sp.data_path(sp.data.train))
        if not self.reader.direct:
            self.notes = (f"{self.reader.path} is chunked or compressed: rows are read by HDF5 hyperslab, several "
                          "times slower at small batches than a contiguous copy (h5repack -f NONE -l CONTI IN OUT)",)
        self.valid_xy: tuple[Any, np.ndarray] | None   # X dense or CSR (kernels.sparse.CsrBatch)
        if sp.data.valid:
            vinfo = _on_root(comm, lambda: describe(sp.data_path(sp.data.valid), task, info.classes, check=False))
            if vinfo.d != info.d:
                raise BadInput(f"{vinfo.path}: validation X has {vinfo.d} columns but training X has {info.d}")
            vr = open_reader(sp.data_path(sp.data.valid), direct=False)   # one contiguous read: no map needed
            self.valid_xy = vr.read_contiguous(*contiguous_share(vinfo.n, self.rank, self.size))
            self.n_valid = vinfo.n
            vr.close()
        else:
            self.valid_xy, self.n_valid = None, 0
        self.order = SampleOrder(self.n, sp.optimizer.batch, sp.seed, sp.data.block_rows)

    def warm_kernels(self) -> bool:
        """Load the kernels of the spec's model from numba's cache (local; no collective); return whether it did.

        Only what this model's gradient and predictions, the reader's batch copy and the
        optimizer's dense update (SGD, AdaGrad) call, on two of this rank's rows with throwaway
        parameters: the first call of any numba kernel pays numba's own set-up
        (most of a kernel load), the others a few ms each. The run's state is not touched,
        so results are the same with or without it. Trees, GP, custom models and GPU phases load theirs at
        their first step.
        """
        from fleetmpi.models import TREE_KINDS, build_model
        sp = self.spec
        if self.device != "cpu" or sp.model.kind in (*TREE_KINDS, "gp", "custom") or sp.lags is not None:
            return False
        X, y = self.reader.read_contiguous(0, min(2, self.n))
        self.reader.read(self.order.bounds(0, min(2, self.n)))   # the batch path's range and copy kernels
        model = build_model(sp.model, self.d, self.classes)
        model.eval_sums(X, y, model.init(np.random.default_rng(0), 0.01))
        if sp.optimizer.kind in ("sgd", "adagrad"):
            from kernels import update
            update.warmup(sp.optimizer.kind)
        return True

    def _open_reader(self, path: Any) -> Any:
        """Return this rank's reader of the training rows (a GPU phase reads into pinned buffers)."""
        from fleetmpi.engine.csr_data import CsrReader
        from fleetmpi.engine.data import open_reader
        reader = open_reader(path)
        kind = self.spec.model.kind
        if isinstance(reader, CsrReader) and kind not in SPARSE_MODEL_KINDS:
            reader.close()
            raise BadInput(f"{path}: holds CSR rows (format csr), which model kind {kind!r} cannot train on; "
                           f"use kind {', '.join(SPARSE_MODEL_KINDS)}")
        return reader

    def _resume(self, ckpt: Any) -> None:
        """Take counters, rule history and the technique's state from checkpoint ``ckpt`` (every rank)."""
        from fleetmpi.engine import checkpoint
        checkpoint.check_compatible(ckpt, self.spec.model_hash())
        meta = ckpt.meta
        self.step, self.cursor = int(meta["step"]), int(meta["cursor"])
        self.samples_seen = int(meta["samples_seen"])
        self.optimizer = str(meta["optimizer"])
        self.fired: set[int] = set(meta.get("fired", []))
        self.carried: dict[str, Any] = dict(meta.get("summary", {}))
        self.technique = self._technique(self.optimizer)
        self.technique.load_state(ckpt.arrays)

    def _fresh(self) -> None:
        """Start at step 0 with the spec's technique and its fresh state."""
        self.step = self.cursor = self.samples_seen = 0
        self.optimizer = MODEL_TECHNIQUES.get(self.spec.model.kind, self.spec.optimizer.kind)
        self.fired = set()
        self.carried = {}
        self.technique = self._technique(self.optimizer)

    # -- techniques -------------------------------------------------------------------------
    def _technique(self, name: str) -> Technique:
        """Return this run's technique ``name``, built on first use (BadInput for an unknown name)."""
        if name not in self._techniques:
            try:
                cls = technique_class(name)
            except ValueError as e:
                raise BadInput(f"{self.resumed_from or self.jd.spec}: {e}") from None
            self._techniques[name] = cls(self)
        return self._techniques[name]

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """Return the object techniques of one family share under ``key``, made by ``make`` once."""
        if key not in self._shared:
            self._shared[key] = make()
        return cast(T, self._shared[key])

    def switch(self, name: str) -> None:
        """Continue the phase with technique ``name`` (every rank alike, after a rule's decision)."""
        self.technique = self._technique(name)
        self.optimizer = name
        self.technique.enter()

    def train_step(self) -> StepRecord:
        """Take one step of the technique in use (collective)."""
        return self.technique.step()

    # -- collectives at evaluation points ---------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Return validation loss/accuracy and the technique's extra metrics (collective; empty without validation data)."""
        from mpi4py import MPI
        if self.valid_xy is None:
            return {}
        X, y = self.valid_xy
        loss, correct = self.technique.eval_sums(X, y) if len(y) else (0.0, 0.0)
        extra = self.technique.extra_valid(X, y)
        names = sorted(extra)
        tot = np.empty(2 + len(names))
        self.comm.Allreduce(np.array([loss, correct, *(extra[k] for k in names)]), tot, op=MPI.SUM)
        out = {"valid_loss": tot[0] / self.n_valid}
        if self.task != "regression":
            out["valid_accuracy"] = tot[1] / self.n_valid
        out.update({k: tot[2 + i] / self.n_valid for i, k in enumerate(names)})
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
        from fleetmpi.engine import checkpoint
        arrays = self.technique.state()
        if self.rank == 0:
            meta = {"step": self.step, "cursor": self.cursor, "samples_seen": self.samples_seen,
                    "epoch": self.samples_seen / self.n, "optimizer": self.optimizer, "phase": self.phase_name,
                    "fired": sorted(self.fired), "spec_hash": self.spec.spec_hash(),
                    "model_hash": self.spec.model_hash(), "model": self.technique.model_meta(),
                    "rng": {"order": "numpy default_rng([seed, epoch]).permutation(blocks)",
                            "seed": self.spec.seed, "block_rows": self.order.block_rows},
                    "ranks": self.size, "reason": reason, "summary": summary}
        full: str | None = None
        if self.rank == 0:
            try:
                path = checkpoint.save(self.jd.ckpt, self.step, arrays, meta, self.spec.checkpoint.keep)
                self.jd.event("checkpoint", step=self.step, path=str(path), reason=reason)
            except OSError as e:   # a full disk ends every rank alike, with one line, not an abort
                full = disk_full(e, self.jd.ckpt, checkpoint.newest_valid_path(self.jd.ckpt),
                                 need=sum(int(a.nbytes) for a in arrays.values()))
                if full is None:
                    raise
        full = self.comm.bcast(full, root=0)
        if full is not None:
            raise DiskFull(full)
        self.checkpointed_step = self.step

    def write_model(self, metrics: dict[str, Any], path: Any = None, **extra: Any) -> None:
        """Write the current model to ``path`` (default: the job's model.h5) with ``extra`` in its meta (rank 0)."""
        from fleetmpi.engine.monitor import finite_or_none
        meta = {"name": self.spec.name, "step": self.step,
                "epoch": self.samples_seen / self.n, "spec_hash": self.spec.spec_hash(),
                "model_hash": self.spec.model_hash(), "metrics": finite_or_none(metrics), **extra}
        meta.update(self._data_meta())
        self.technique.write_model(self.jd.model if path is None else path, meta)

    def _data_meta(self) -> dict[str, Any]:
        """Return what predict needs of the training data's preparation ({} for plain HDF5); read once.

        make-data's preprocessing record (column order, standardisation, class names) for
        tables, and the hashing settings and class names for hashed text.
        """
        if not hasattr(self, "_data_meta_cache"):
            self._data_meta_cache: dict[str, Any] = {}
            if self.spec.lags is None:
                from fleetmpi.preprocess import preprocess_meta
                from fleetmpi.text import text_meta
                train = self.spec.data_path(self.spec.data.train)
                self._data_meta_cache = {**preprocess_meta(train), **text_meta(train)}
        return self._data_meta_cache

    @property
    def best_path(self) -> Any:
        """Return the job's best.h5: the parameters of the best valid_loss so far (checkpoint.keep_best)."""
        return self.jd.root / "best.h5"

    def write_final_model(self, metrics: dict[str, Any], best_step: int | None, use_best: bool) -> int:
        """Write model.h5: a copy of best.h5 when ``use_best`` and it holds ``best_step``, else the current model.

        Rank 0. Return the step whose parameters model.h5 holds.
        """
        from fleetmpi.h5store import read_h5_verified
        from fleetmpi.jobdir import atomic_write_bytes
        if use_best and best_step is not None and self.best_path.exists():
            try:
                _, meta = read_h5_verified(self.best_path)
            except (CheckpointError, OSError):   # a damaged best.h5 must not lose the run: write the current model
                meta = {}
            if meta.get("step") == best_step:
                # A byte copy keeps the file's own checksum; its meta says the step it came from.
                atomic_write_bytes(self.jd.model, self.best_path.read_bytes())
                return best_step
        self.write_model(metrics)
        return self.step


def gc_after_startup() -> None:
    """Turn the cyclic garbage collector back on where the rank entry turned it off for start-up.

    ``gc.freeze()`` first: the objects of the start-up (modules, numba's registries) live as long
    as the process, and frozen they are not traversed by the collections of the training loop
    either. Where the collector is on (the worker imported, not run as the rank entry), nothing.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


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
