"""Tree ensembles (model kinds gbdt | forest | tree) as a training technique: one step is one round.

Each rank reads its contiguous share of the training rows once, bins them with cut points
agreed on by every rank (computed once from a seeded sample of global rows, kept in the
job dir's ``cuts.h5`` and in every checkpoint) and keeps a prediction cache for its rows.
A step grows one round (one tree per class for softmax, one tree for a forest) through
``fleetmpi.models.trees.TreeLearner`` with MPI reducers; its histograms are integer sums,
so the trees are the same bit for bit at any rank count, and a checkpoint (cuts, trees,
base score, round) lets a phase on any other rank count continue as if nothing happened:
the cache is recomputed from the trees, which gives the same bits as the cache grown.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetmpi.engine.technique import StepRecord, Technique
from fleetmpi.errors import BadInput, CheckpointError, TrainingFailed
from fleetmpi.models.trees import Ensemble, TreeLearner, TreeParams, forest_scores
from kernels import trees as K

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer

CUT_SAMPLE_ROWS = 200_000    # rows every rank's cut points come from (LightGBM's bin_construct_sample_cnt)
CUTS_FILE = "cuts.h5"        # in the job dir: the cut points, written once, read by every later phase
STATE_NAMES = ("cuts", "ncuts", "base", "round", "feature", "bin", "threshold", "left", "right", "value", "offsets",
               "tree_class")


def tree_params(run: Trainer) -> TreeParams:
    """Return the learner's settings from the run's spec, task and class count."""
    m = run.spec.model
    return TreeParams(kind=m.kind, task=run.task, classes=int(run.classes or 2), trees=m.tree_value("trees"),
                      depth=m.tree_value("depth"), learning_rate=m.tree_value("learning_rate"),
                      bins=m.tree_value("bins"), l2=m.l2, min_child_weight=m.tree_value("min_child_weight"),
                      row_sample=m.tree_value("row_sample"), col_sample=m.tree_value("col_sample"),
                      seed=run.spec.seed)


def _loss_sum(z: np.ndarray, y: np.ndarray, task: str) -> float:
    """Return the summed training objective of raw scores z (n, outputs) on labels y."""
    if z.shape[0] == 0:
        return 0.0
    if task == "regression":
        return K.grad_squared(np.ascontiguousarray(z[:, 0]), y)[0]
    if task == "binary":
        return K.grad_logistic(np.ascontiguousarray(z[:, 0]), y)[0]
    return K.grad_softmax(np.ascontiguousarray(z), y)[0]


class Boost(Technique):
    """One boosting round (forest: one bootstrapped tree; tree: the one tree) over every rank's rows."""

    name = "boost"

    def __init__(self, run: Trainer) -> None:
        from fleetmpi.engine.h5rows import contiguous_share, row_fingerprint
        super().__init__(run)
        self.p = tree_params(run)
        lo, hi = contiguous_share(run.n, run.rank, run.size)
        self.X, self.y = run.reader.read_contiguous(lo, hi)
        self.row_ids = np.arange(lo, hi, dtype=np.int64)
        self.fp = row_fingerprint(0, run.n)        # every round visits every row
        self.comm_s = 0.0
        self.learner: TreeLearner | None = None
        self.codes = np.empty((0, run.d), np.uint8)
        self.pred = np.empty((0, self.p.outputs))

    # -- collectives over the run's communicator, timed -------------------------------------
    def _reducers(self) -> tuple[Any, Any]:
        from fleetmpi.models.trees import mpi_reducers
        reduce, reduce_max = mpi_reducers(self.run.comm)

        def timed(fn: Any) -> Any:
            def call(a: np.ndarray) -> np.ndarray:
                t0 = time.perf_counter()
                out = fn(a)
                self.comm_s += time.perf_counter() - t0
                return out
            return call
        return timed(reduce), timed(reduce_max)

    def _learner(self, cuts: np.ndarray, ncuts: np.ndarray) -> TreeLearner:
        if cuts.ndim != 2 or cuts.shape[0] != self.run.d or ncuts.shape != (self.run.d,):
            raise CheckpointError(f"{self.run.resumed_from or self.run.jd.root / CUTS_FILE}: cut points for "
                                  f"{cuts.shape[0] if cuts.ndim == 2 else '?'} features but the data has {self.run.d}")
        learner = TreeLearner(self.p, cuts, ncuts, *self._reducers())
        self.codes = K.bin_rows(self.X, cuts, ncuts)
        return learner

    def _cuts(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the job's cut points: from the job dir if an earlier phase made them, else made now (collective)."""
        from fleetmpi.h5store import read_h5_verified, write_h5_atomic
        from fleetmpi.models.trees import cut_sample_ids, gather_sample
        run = self.run
        path = run.jd.root / CUTS_FILE
        found = None
        if run.rank == 0 and path.is_file():
            arrays, _ = read_h5_verified(path, kind="cuts")
            found = (arrays["cuts"], arrays["ncuts"])
        found = run.comm.bcast(found, root=0)
        if found is not None:
            return found
        ids = cut_sample_ids(run.n, CUT_SAMPLE_ROWS, run.spec.seed)
        sample = gather_sample(self.X, self.row_ids, ids, run.comm.allgather)
        cuts, ncuts = K.cut_points(sample, self.p.bins) if run.rank == 0 else (None, None)
        cuts, ncuts = run.comm.bcast((cuts, ncuts), root=0)
        if run.rank == 0:
            write_h5_atomic(path, {"cuts": cuts, "ncuts": ncuts},
                            {"bins": self.p.bins, "seed": run.spec.seed, "sample_rows": int(ids.size),
                             "rows": run.n, "d": run.d}, kind="cuts")
        return cuts, ncuts

    def _start(self) -> TreeLearner:
        """Agree on the cuts and the base score and fill the prediction cache (collective, fresh runs)."""
        learner = self._learner(*self._cuts())
        base = learner.init_base(self.y)
        self.pred = np.tile(base, (self.y.shape[0], 1))
        self.learner = learner
        return learner

    # -- the contract -----------------------------------------------------------------------
    def step(self) -> StepRecord:
        from mpi4py import MPI
        run = self.run
        t0 = time.perf_counter()
        self.comm_s = 0.0
        learner = self.learner or self._start()
        bytes0 = learner.hist_bytes
        learner.fit_round(self.codes, self.y, self.pred, self.row_ids)
        e = learner.ensemble
        local = _loss_sum(forest_scores(self.pred, e.base, self.p.kind, self.p.trees, e.rounds), self.y, self.p.task)
        tc = time.perf_counter()
        tot = np.empty(2)
        run.comm.Allreduce(np.array([local, float(run.stop_signal)]), tot, op=MPI.SUM)
        self.comm_s += time.perf_counter() - tc
        payload = learner.hist_bytes - bytes0
        P = run.size
        rec = StepRecord(loss=float(tot[0]) / run.n, lr=self.p.learning_rate if self.p.kind == "gbdt" else 1.0,
                         samples=run.n, batch_fp=self.fp, cursor=run.cursor,
                         compute_s=time.perf_counter() - t0 - self.comm_s, comm_s=self.comm_s,
                         payload_bytes=payload, wire_bytes=payload * 2.0 * (P - 1) / P, signal=float(tot[1]))
        run.cursor += run.n
        run.samples_seen += run.n
        return rec

    def state(self) -> dict[str, np.ndarray]:
        from mpi4py import MPI
        run = self.run
        learner = self.learner or self._start()
        st = learner.ensemble.state()
        # Every rank grew the same trees; check before trusting rank 0's copy.
        probe = np.array([float(st["value"].sum()), float(st["feature"].size), float(st["round"])])
        lo, hi = np.empty(3), np.empty(3)
        run.comm.Allreduce(probe, lo, op=MPI.MIN)
        run.comm.Allreduce(probe, hi, op=MPI.MAX)
        if not np.array_equal(lo, hi):
            raise TrainingFailed(f"ranks hold different trees at step {run.step}; refusing to checkpoint")
        return st if run.rank == 0 else {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        where = self.run.resumed_from
        missing = [n for n in STATE_NAMES if n not in arrays]
        if missing:
            raise BadInput(f"{where}: not a tree checkpoint (no {', '.join(missing)}); it was written for another "
                           f"model kind than {self.p.kind}")
        try:
            ens = Ensemble.from_state(arrays, self.p.task)
        except (IndexError, ValueError) as e:
            raise CheckpointError(f"{where}: tree arrays do not fit together ({e})") from None
        if ens.base.shape != (self.p.outputs,) or (ens.trees and int(arrays["tree_class"].max()) >= self.p.outputs):
            raise BadInput(f"{where}: trees for {ens.base.size} outputs but a {self.p.task} model with "
                           f"{self.p.outputs} output(s) resumes from it")
        learner = self._learner(ens.cuts, ens.ncuts)
        learner.ensemble = ens
        self.pred = np.ascontiguousarray(ens.raw(self.X))
        self.learner = learner

    def eval_sums(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        if self.learner is None:
            raise RuntimeError("evaluation before the first round")
        e = self.learner.ensemble
        z = forest_scores(e.raw(X), e.base, self.p.kind, self.p.trees, e.rounds)
        loss = _loss_sum(z, y, self.p.task)
        if self.p.task == "regression":
            return loss, 0.0
        pred = (z[:, 0] >= 0.0) if self.p.task == "binary" else z.argmax(axis=1)
        return loss, float((pred.astype(np.float32) == y).sum())

    def model_meta(self) -> dict[str, Any]:
        p = self.p
        return {"kind": p.kind, "task": p.task, "classes": p.classes if p.task == "multiclass" else None,
                "d": self.run.d, "trees": p.trees, "depth": p.depth, "learning_rate": p.learning_rate,
                "bins": p.bins, "l2": p.l2, "min_child_weight": p.min_child_weight, "row_sample": p.row_sample,
                "col_sample": p.col_sample, "seed": p.seed}

    def write_model(self, path: Path, meta: dict[str, Any]) -> None:
        from fleetmpi.h5store import write_h5_atomic
        if self.learner is None:
            raise RuntimeError("no trees to write before the first round")
        write_h5_atomic(path, self.learner.ensemble.state(), {**self.model_meta(), **meta}, kind="model")
