"""Gradient techniques on a flat float64 parameter vector: SGD, AdaGrad, L-BFGS and full BFGS.

They share one ``FlatState`` per run (model, parameters, weight mask, sync, the
optimizers' state), so a rule that switches between them hands over the parameters,
and a checkpoint holds the same arrays whichever of them runs: ``params``,
``sgd_velocity``, ``lbfgs_S/Y/g/f``, the sync's (``sync_residual``, ``sync_tau``),
``bfgs_H/g/f`` once BFGS ran (its d x d matrix is made only for a run that uses it) and
``adagrad_acc`` once AdaGrad ran (host only: a GPU phase refuses it).

``FlatState`` computes on the host; ``fleetmpi.engine.gpu.GpuFlatState`` overrides its
device hooks (``sgd_gradient``, ``sgd_apply``, ``global_grad``, ``to_host``,
``from_host``). The techniques' arithmetic is written once, here.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetmpi.engine.technique import StepRecord, Technique
from fleetmpi.errors import BadInput, TrainingFailed
from fleetmpi.sync.base import Extra, Extras

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer
    from fleetmpi.optim import BFGS, LBFGS, SGD
    from fleetmpi.optim import Adagrad as AdagradState

# (this rank's X, y, fingerprint of its rows, global row count) of L-BFGS's objective
Rows = tuple[np.ndarray, np.ndarray, float, int]
# (global gradient sum, global extras, compute s, comm s)
Reduced = tuple[Any, np.ndarray, float, float]


class FlatState:
    """Parameters and optimizer state of the gradient techniques on one rank, with their sync."""

    def __init__(self, run: Trainer) -> None:
        from fleetmpi.models import build_model
        from fleetmpi.optim import LBFGS, SGD
        from fleetmpi.sync import build_sync
        sp = run.spec
        self.run = run
        self.model = build_model(sp.model, run.d, run.classes)
        p = self.n_params = self.model.n_params
        self.mask = self.model.weight_mask()
        self.sync = build_sync(sp.sync, run.comm, p)
        self.grad = self.sync.grad_out   # kernels write into the sync's send buffer
        self.sgd = SGD(sp.optimizer, p)
        self.lbfgs = LBFGS(sp.optimizer.lbfgs, p)
        self.lbfgs_data: Rows | None = None
        self.bfgs: BFGS | None = None     # made by bfgs_state(): d x d floats only where BFGS runs
        self.adagrad: AdagradState | None = None   # made by adagrad_state() where AdaGrad runs
        self.last_loss = float("nan")     # SGD's last reported training loss per row
        self.params = self.model.init(np.random.default_rng([sp.seed, 0x1417]), sp.model.init_scale)

    # -- checkpoint state -------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Return params, both optimizers' and the sync's state on rank 0 (collective)."""
        from mpi4py import MPI
        self.to_host()
        run = self.run
        # Every rank must hold the same parameters; check before trusting rank 0's copy.
        probe = np.array([float(self.params.sum()), float(np.dot(self.params, self.params))])
        lo, hi = np.empty(2), np.empty(2)
        run.comm.Allreduce(probe, lo, op=MPI.MIN)
        run.comm.Allreduce(probe, hi, op=MPI.MAX)
        if not np.array_equal(lo, hi):
            raise TrainingFailed(f"ranks hold different parameters at step {run.step}; refusing to checkpoint")
        extra = self.sync.gather_state()
        if run.rank != 0:
            return {}
        bfgs = self.bfgs.state() if self.bfgs is not None else {}
        ada = self.adagrad.state() if self.adagrad is not None else {}
        return {"params": self.params, **self.sgd.state(), **self.lbfgs.state(), **bfgs, **ada, **extra}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Load params, optimizers and this rank's share of the sync's state (every rank)."""
        params = np.array(arrays["params"], dtype=np.float64)
        if params.shape != (self.n_params,):
            raise BadInput(f"{self.run.resumed_from}: params have shape {params.shape} but the model needs "
                           f"({self.n_params},)")
        self.params = params
        self.sgd.load_state(arrays)
        self.lbfgs.load_state(arrays)
        if "bfgs_H" in arrays:
            self.bfgs_state().load_state(arrays, str(self.run.resumed_from))
        if "adagrad_acc" in arrays:
            self.adagrad_state().load_state(arrays)
        self.sync.load_state(arrays)
        self.from_host()

    def bfgs_state(self) -> BFGS:
        """Return BFGS's state, made on first use; BadInput if its matrix would pass the size limit."""
        if self.bfgs is None:
            from fleetmpi.optim import BFGS
            try:
                self.bfgs = BFGS(self.run.spec.optimizer.bfgs, self.n_params)
            except ValueError as e:
                raise BadInput(f"{self.run.resumed_from or self.run.jd.spec}: optimizer bfgs: {e}") from None
        return self.bfgs

    def adagrad_state(self) -> AdagradState:
        """Return AdaGrad's state (an accumulator per parameter), made on first use."""
        if self.adagrad is None:
            from fleetmpi.optim import Adagrad as AdagradState
            self.adagrad = AdagradState(self.run.spec.optimizer, self.n_params)
        return self.adagrad

    # -- device hooks (host versions) -------------------------------------------------------
    def to_host(self) -> None:
        """Make ``params`` and ``sgd.velocity`` current on the host (the GPU copies them back)."""

    def from_host(self) -> None:
        """Hand the host ``params``, velocity and sync state to wherever the steps compute."""

    def sgd_gradient(self) -> Reduced:
        """Return the global gradient sum of the run's current batch; collective."""
        run = self.run
        start, stop = run.order.share(run.step, run.rank, run.size)
        X, y, fp = run.reader.read(run.order.bounds(start, stop))
        return self.global_grad(self.params, (X, y, fp, len(y)))

    def sgd_apply(self, g: Any, lr: float) -> None:
        """Take one SGD step at learning rate ``lr`` from global gradient sum ``g`` (every rank alike)."""
        self.apply_sum(self.sgd, g, lr)

    def apply_sum(self, opt: SGD | AdagradState, g: np.ndarray, lr: float) -> None:
        """Take one step of ``opt`` (host) at learning rate ``lr`` from global gradient sum ``g``."""
        # One pass, no temporaries (bitwise the numpy sequence g / B + l2 * mask * params, then
        # SGD.apply); on the rows a CSR batch touched only, where that is exact (SGD.apply_sum).
        touched = self.sync.touched
        k = self.n_params // (self.run.d + 1) if touched is not None else 0
        opt.apply_sum(self.params, g, self.run.spec.optimizer.batch, self.model.l2, self.mask, lr, touched, k)

    def global_grad(self, w: np.ndarray, data: Rows) -> Reduced:
        """Return (host gradient sum over all ranks, extras, compute s, comm s) at ``w``; collective."""
        X, y, fp, _ = data
        t0 = time.perf_counter()
        loss_sum = self.sync.local_grad(self.model, X, y, w, self.grad)
        t1 = time.perf_counter()
        g, ex = self.sync.reduce(self.grad, Extras(loss_sum, len(y), fp, self.run.stop_signal).array())
        return g, ex, t1 - t0, time.perf_counter() - t1

    # -- L-BFGS's rows ----------------------------------------------------------------------
    def lbfgs_rows(self) -> Rows:
        """Return this rank's rows of L-BFGS's objective (read once: full data or a fixed batch)."""
        if self.lbfgs_data is None:
            from fleetmpi.engine.h5rows import contiguous_share, row_fingerprint
            run = self.run
            batch = run.spec.optimizer.lbfgs.batch
            if batch == "full" or batch >= run.n:
                lo, hi = contiguous_share(run.n, run.rank, run.size)
                X, y = run.reader.read_contiguous(lo, hi)
                self.lbfgs_data = (X, y, row_fingerprint(lo, hi), run.n)
            else:
                # A fixed batch: the first ``batch`` positions of epoch 0's order.
                order = type(run.order)(run.n, batch, run.spec.seed, run.spec.data.block_rows)
                X, y, fp = run.reader.read(order.bounds(*order.share(0, run.rank, run.size)))
                self.lbfgs_data = (X.copy(), y.copy(), fp, int(batch))
        return self.lbfgs_data


class GradientTechnique(Technique):
    """A technique that steps the run's shared ``FlatState`` (``run.flat_state_class``)."""

    def __init__(self, run: Trainer) -> None:
        super().__init__(run)
        self.flat: FlatState = run.shared("flat", lambda: run.flat_state_class(run))

    def state(self) -> dict[str, np.ndarray]:
        return self.flat.state()

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.flat.load_state(arrays)

    def enter(self) -> None:
        # The parameters moved under another technique: the stored objectives are stale.
        self.flat.lbfgs.f = None
        if self.flat.bfgs is not None:
            self.flat.bfgs.f = None

    def eval_sums(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        self.flat.to_host()
        return self.flat.model.eval_sums(X, y, self.flat.params)

    def model_meta(self) -> dict[str, Any]:
        return self.flat.model.meta()

    def write_model(self, path: Path, meta: dict[str, Any]) -> None:
        from fleetmpi.h5store import write_h5_atomic
        self.flat.to_host()
        write_h5_atomic(path, {"params": self.flat.params}, {**self.flat.model.meta(), **meta}, kind="model")


class Sgd(GradientTechnique):
    """One minibatch SGD step (momentum, schedule) on the global batch; bytes through the sync."""

    name = "sgd"

    def update(self, g: Any) -> float:
        """Apply this technique's update from global gradient sum ``g``; return the learning rate."""
        lr = self.flat.sgd.lr(self.run.step)
        self.flat.sgd_apply(g, lr)
        return lr

    def step(self) -> StepRecord:
        run, flat = self.run, self.flat
        B = run.spec.optimizer.batch
        flat.sync.defer_extras = True   # the record may take the loss a few steps late (sync.base)
        g, ex, compute_s, comm_s = flat.sgd_gradient()
        lr = self.update(g)
        e = Extras.of(ex)
        # Loss per row over the steps the extras cover (this one, or a threshold sync's window);
        # a step they skip repeats the last reported loss.
        if e.rows:
            flat.last_loss = e.loss / e.rows
        rec = StepRecord(loss=flat.last_loss, lr=lr, samples=int(e.rows), batch_fp=e.batch_fp, cursor=run.cursor,
                         compute_s=compute_s, comm_s=comm_s, payload_bytes=flat.sync.payload_bytes,
                         wire_bytes=flat.sync.wire_bytes, signal=e.signal)
        run.cursor += B
        run.samples_seen += B
        return rec


class Adagrad(Sgd):
    """One minibatch AdaGrad step (fleetmpi.optim.adagrad) on the global batch; CPU phases only."""

    name = "adagrad"

    def __init__(self, run: Trainer) -> None:
        super().__init__(run)
        if run.device != "cpu":
            raise BadInput(f"{run.resumed_from or run.jd.spec}: optimizer.kind adagrad runs on CPU phases only; "
                           "this phase has GPUs: use kind sgd there, or a phase without gpus_per_node")
        self.flat.adagrad_state()

    def update(self, g: Any) -> float:
        opt = self.flat.adagrad_state()
        lr = opt.lr(self.run.step)
        self.flat.apply_sum(opt, g, lr)
        return lr


class LineSearchTechnique(GradientTechnique):
    """A quasi-Newton iteration with its line search on fixed rows; each objective is one sync.

    The rows are ``FlatState.lbfgs_rows`` (the full data unless ``optimizer.lbfgs.batch``
    fixes a batch); the optimizer's state stays on the host and each objective runs where
    the state computes (a GPU phase's device, a CPU phase's kernels).
    """

    @abstractmethod
    def optimizer(self) -> LBFGS | BFGS:
        """Return the optimizer whose ``step(params, objective)`` this technique runs."""

    def step(self) -> StepRecord:
        run, flat = self.run, self.flat
        opt = self.optimizer()
        data = flat.lbfgs_rows()
        fp, N = data[2], data[3]
        acc: dict[str, float] = {"compute_s": 0.0, "comm_s": 0.0, "payload": 0, "wire": 0.0, "signal": 0.0,
                                 "evals": 0}

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            g, ex, compute_s, comm_s = flat.global_grad(w, data)
            acc["compute_s"] += compute_s
            acc["comm_s"] += comm_s
            acc["payload"] += flat.sync.payload_bytes
            acc["wire"] += flat.sync.wire_bytes
            acc["signal"] = max(acc["signal"], ex[Extra.SIGNAL])
            acc["evals"] += 1
            grad = g / N
            loss = ex[Extra.LOSS] / N
            if flat.model.l2:
                grad = grad + flat.model.l2 * flat.mask * w
                loss += 0.5 * flat.model.l2 * float(np.sum(flat.mask * w * w))
            return loss, grad.copy()

        flat.sync.defer_extras = False   # every objective needs its own loss
        flat.to_host()
        loss, moved = opt.step(flat.params, objective)
        flat.from_host()
        evals = int(acc["evals"])
        run.samples_seen += evals * N
        # Converged: the gradient is within tol_grad, so every further step would evaluate
        # nothing (no epoch passes, no stop signal travels): the fit is solved and the run ends.
        converged = not moved and opt.g is not None and float(np.linalg.norm(opt.g)) <= opt.spec.tol_grad
        return StepRecord(loss=loss, lr=opt.last_step, samples=evals * N, batch_fp=fp, cursor=run.cursor,
                          compute_s=acc["compute_s"], comm_s=acc["comm_s"], payload_bytes=int(acc["payload"]),
                          wire_bytes=acc["wire"], signal=acc["signal"], solved=converged)


class Lbfgs(LineSearchTechnique):
    """One L-BFGS iteration (history of ``optimizer.lbfgs.history`` pairs)."""

    name = "lbfgs"

    def optimizer(self) -> LBFGS:
        return self.flat.lbfgs


class Bfgs(LineSearchTechnique):
    """One full-BFGS iteration: a d x d inverse Hessian on every rank, updated in O(d^2)."""

    name = "bfgs"

    def __init__(self, run: Trainer) -> None:
        super().__init__(run)
        self.flat.bfgs_state()   # the size limit refuses here, before a step (every rank alike)

    def optimizer(self) -> BFGS:
        return self.flat.bfgs_state()
