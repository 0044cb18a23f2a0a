"""The gp technique: a random-feature GP fitted from exact, rank-count-free statistics.

Rows are cut into global chunks of ``CHUNK_ROWS`` (chunk c holds rows c*CHUNK_ROWS ..);
each rank reads a contiguous run of whole chunks. A chunk's statistics come from BLAS on
the same rows and shapes whatever the rank count, so they are the same bits on any split;
chunks are then summed as fixed-point int64 (``exact_gram``, ``exact_vector_sum``), whose
integer Allreduce is associative. So the hyperparameters, the posterior and the model
file are bitwise the same on 1, 2 or 3 ranks.

One step is one L-BFGS iteration (``fleetmpi.optim.lbfgs``) on -LML / n over the free
hyperparameters (log lengthscales, log signal variance, log noise variance). Each
objective evaluation makes one pass over the rank's rows for the Gram of [F, y] and one
Allreduce of it (signal and noise variance act on the Gram analytically, so a line
search that moves only them reuses it). A free shared lengthscale's gradient needs
S^T [F, y] (S = dF / d log l), summed in the same pass and the same Allreduce; free ARD
lengthscales take a second pass (one Allreduce of d numbers). When L-BFGS stops moving, or
nothing is ``auto``, the step solves the posterior and reports ``solved``: the run ends.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetmpi.engine.technique import StepRecord, Technique
from fleetmpi.errors import BadInput, TrainingFailed
from fleetmpi.models.gp import (
    Fit,
    GpModel,
    chunk_stats,
    draw_frequencies,
    fit_stats,
    lengthscale_grad_rows,
    shared_lengthscale_grad,
    split_theta,
)

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer

CHUNK_ROWS = 1024          # rows per global chunk: BLAS-sized, and the unit of the exact sum
LOG_BOUND = 25.0           # |log hyperparameter| beyond which the objective is refused (e**25 ~ 7e10)
F_RTOL = 1e-9              # L-BFGS has converged when -LML/n moves less than this, relatively
# A line-search trial moving a log hyperparameter further than this from the accepted point
# (a factor e**2) is refused without a pass over the rows: an overlong L-BFGS direction then
# costs halvings, not evaluations (one seen at 100k rows took 17 of them, each a full pass).
MAX_LOG_MOVE = 2.0
# ... and one whose first-order decrease is below this (relative to -LML/n) is refused too: at
# large n the objective's own rounding is about that big (q/e and r.m/e, each ~n/e, cancel
# through an ill-conditioned A), so Armijo there fails on noise, one full pass per halving.
MIN_LS_DECREASE = 1e-6


def chunk_share(n: int, rank: int, size: int) -> tuple[int, int]:
    """Return rows [lo, hi) of this rank: a contiguous run of whole global chunks of CHUNK_ROWS."""
    chunks = -(-n // CHUNK_ROWS)
    return min(n, rank * chunks // size * CHUNK_ROWS), min(n, (rank + 1) * chunks // size * CHUNK_ROWS)


def exact_gram(comm: Any, grams: list[np.ndarray], k: int, gram_bound: float, n_blocks: int,
               extras: list[np.ndarray] | None = None, extra_bound: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Return (sum of the chunks' Grams, sum of their extra matrices or None, bytes sent); exact, collective.

    ``grams`` are this rank's chunks' symmetric (k, k) B^T B (each a whole global chunk,
    from BLAS on the same rows and shapes at any rank count); ``gram_bound`` bounds every
    |entry| of every chunk's Gram on every rank and ``n_blocks`` counts the chunks of all
    ranks (all global, so the fixed-point scales are too). ``extras`` (one non-symmetric
    matrix per chunk, entries bounded by ``extra_bound``) ride in the same integer
    Allreduce as the Gram's upper triangle.

    Why not closed_form's ``exact_gram``: that one rounds every row's products (windows
    split over ranks at any row, and its k is a few lags), where this one rounds a whole
    chunk's BLAS product once (D of 1024 features make per-row products n D^2 scalar
    roundings, and ranks hold whole chunks, so a chunk's Gram is the same bits anywhere).
    """
    from mpi4py import MPI

    from kernels.exact import fixed_scale
    iu = np.triu_indices(k)
    m = iu[0].size
    scale = fixed_scale(gram_bound, n_blocks)
    extra_shape = extras[0].shape if extras else (k - 1, k)
    n_extra = extra_shape[0] * extra_shape[1] if extras is not None else 0
    escale = fixed_scale(extra_bound, n_blocks)
    acc = np.zeros(m + n_extra, np.int64)
    for G in grams:
        acc[:m] += np.rint(G[iu] * scale).astype(np.int64)
    for E in extras or ():
        acc[m:] += np.rint(E.ravel() * escale).astype(np.int64)
    tot = np.empty_like(acc)
    comm.Allreduce([acc, MPI.INT64_T], [tot, MPI.INT64_T], op=MPI.SUM)
    out = np.empty((k, k))
    out[iu] = tot[:m] * (1.0 / scale)
    out.T[iu] = out[iu]
    extra = (tot[m:] * (1.0 / escale)).reshape(extra_shape) if extras is not None else None
    return out, extra, acc.nbytes


def exact_vector_sum(comm: Any, parts: np.ndarray, n_parts: int) -> np.ndarray:
    """Return the sum over every rank's rows of ``parts`` (local (k, m)); exact for any split of the rows."""
    from mpi4py import MPI

    from kernels.exact import fixed_scale
    local = float(np.abs(parts).max()) if parts.size else 0.0
    bound = comm.allreduce(local, op=MPI.MAX)
    if not math.isfinite(bound):
        raise TrainingFailed(f"gp: a statistic is not finite (bound {bound}); check the data's scale")
    scale = fixed_scale(bound, n_parts)
    acc = np.rint(parts * scale).astype(np.int64).sum(axis=0) if parts.size else np.zeros(parts.shape[1], np.int64)
    tot = np.empty_like(acc)
    comm.Allreduce([np.ascontiguousarray(acc), MPI.INT64_T], [tot, MPI.INT64_T], op=MPI.SUM)
    return tot * (1.0 / scale)


class Gp(Technique):
    """Fit a random-feature GP's hyperparameters by L-BFGS on exact statistics, then solve its posterior."""

    name = "gp"

    def __init__(self, run: Trainer) -> None:
        from fleetmpi.optim.lbfgs import LBFGS
        from fleetmpi.spec import GP_DEFAULTS, LbfgsSpec
        super().__init__(run)
        m = run.spec.model
        cfg = {k: (GP_DEFAULTS[k] if getattr(m, k) is None else getattr(m, k)) for k in GP_DEFAULTS}
        self.cfg = cfg
        self.D = int(cfg["features"])
        self.kernel = str(cfg["kernel"])
        self.n_ls = run.d if (cfg["ard"] and cfg["lengthscale"] == "auto") else 1
        self.free = np.array([cfg["lengthscale"] == "auto"] * self.n_ls
                             + [cfg["signal"] == "auto", cfg["noise"] == "auto"])
        self.omega, self.b = draw_frequencies(self.kernel, run.d, self.D, run.spec.seed)
        lo, hi = chunk_share(run.n, run.rank, run.size)
        self.X, y = run.reader.read_contiguous(lo, hi)
        self.y_raw = y.astype(np.float64)
        self.starts = list(range(0, hi - lo, CHUNK_ROWS))
        self.n_chunks = -(-run.n // CHUNK_ROWS)
        # tol_grad on -LML/n; history and line search as scipy's L-BFGS-B defaults roughly.
        self.lbfgs = LBFGS(LbfgsSpec(history=10, max_ls=30, c1=1e-4, tol_grad=1e-6), int(self.free.sum()))
        self.theta: np.ndarray | None = None
        self.y_mean = self.y_std = self.y_bound = 0.0
        self._gram: tuple[bytes, np.ndarray] | None = None
        # One free shared lengthscale: its gradient's statistic comes from the Gram's pass.
        # ARD would need d such D x (D + 1) sums: its gradient keeps a pass of its own.
        self.fused = bool(self.n_ls == 1 and self.free[0])
        self._dstats: tuple[bytes, np.ndarray] | None = None
        self._x_bound: float | None = None
        self._omega_l1 = float(np.abs(self.omega).sum(axis=1).max()) if self.D else 0.0
        self._fit: tuple[bytes, Fit] | None = None
        self.solved = False
        self._acc = {"passes": 0, "payload": 0, "compute_s": 0.0, "comm_s": 0.0}

    # -- setup ------------------------------------------------------------------------------
    def _chunks(self, A: np.ndarray) -> list[np.ndarray]:
        return [A[s:s + CHUNK_ROWS] for s in self.starts]

    def _setup(self) -> None:
        """Standardise y and start theta from the data's spread (collective; exact sums)."""
        run, d = self.run, self.run.d
        X64 = [c.astype(np.float64) for c in self._chunks(self.X)]
        ys = self._chunks(self.y_raw)

        def per_chunk(rows: list[np.ndarray]) -> np.ndarray:
            return np.array(rows) if rows else np.empty((0, 1 + d))

        sums = exact_vector_sum(run.comm, per_chunk([np.r_[y.sum(), x.sum(axis=0)] for x, y in zip(X64, ys)]),
                                self.n_chunks)
        mean = sums / run.n
        dev = exact_vector_sum(run.comm, per_chunk([np.r_[((y - mean[0]) ** 2).sum(), ((x - mean[1:]) ** 2).sum(axis=0)]
                                                    for x, y in zip(X64, ys)]), self.n_chunks)
        var = dev / run.n
        self.y_mean = float(mean[0])
        self.y_std = float(math.sqrt(var[0])) if var[0] > 0 else 1.0
        self.y = (self.y_raw - self.y_mean) / self.y_std
        from mpi4py import MPI
        self.y_bound = float(run.comm.allreduce(float(np.abs(self.y).max()) if self.y.size else 0.0, op=MPI.MAX))
        xvar = np.where(var[1:] > 0, var[1:], 1.0)
        ls0 = np.array([math.sqrt(float(xvar.sum()))]) if self.n_ls == 1 else np.sqrt(d * xvar)
        cfg = self.cfg
        fixed_ls = cfg["lengthscale"] if cfg["lengthscale"] != "auto" else None
        ls = np.full(self.n_ls, float(fixed_ls)) if fixed_ls is not None else ls0
        s = 1.0 if cfg["signal"] == "auto" else float(cfg["signal"])
        e = 0.1 if cfg["noise"] == "auto" else float(cfg["noise"])
        self.theta = np.r_[np.log(ls), math.log(s), math.log(e)]

    # -- statistics -------------------------------------------------------------------------
    def gram_at(self, ls: np.ndarray, with_dls: bool = False) -> np.ndarray:
        """Return the exact global Gram of [F, y] at lengthscales ``ls`` (one pass, one Allreduce; cached).

        ``with_dls`` (one free shared lengthscale): the same pass also sums S^T [F, y], its
        gradient's statistic (``self._dstats``), so an evaluation reads the rows once.
        """
        key = ls.tobytes()
        if self._gram is None or self._gram[0] != key or (with_dls and (self._dstats is None
                                                                        or self._dstats[0] != key)):
            from mpi4py import MPI
            if with_dls and self._x_bound is None:
                local = float(np.abs(self.X).max()) if self.X.size else 0.0
                self._x_bound = float(self.run.comm.allreduce(local, op=MPI.MAX))
            t0 = time.perf_counter()
            stats = [chunk_stats(x, y, self.omega, self.b, ls, with_dls)
                     for x, y in zip(self._chunks(self.X), self._chunks(self.y))]
            t1 = time.perf_counter()
            yb = max(1.0, self.y_bound)
            # |S| = |sin Z| |Z - b| <= max|x| * max_j |omega_j|_1 / l: a global bound, no extra collective.
            s_bound = (self._x_bound or 0.0) * self._omega_l1 / float(ls[0])
            gram, dstats, nbytes = exact_gram(self.run.comm, [g for g, _ in stats], self.D + 1,
                                              CHUNK_ROWS * yb * yb, self.n_chunks,
                                              [e for _, e in stats if e is not None] if with_dls else None,
                                              CHUNK_ROWS * s_bound * yb)
            self._note(t1 - t0, time.perf_counter() - t1, nbytes)
            self._gram = (key, gram)
            if dstats is not None:
                self._dstats = (key, dstats)
        return self._gram[1]

    def fit_at(self, theta: np.ndarray) -> Fit:
        """Return the fit at ``theta`` (collective when its lengthscales' Gram is not cached)."""
        key = theta.tobytes()
        if self._fit is None or self._fit[0] != key:
            ls, s, e = split_theta(theta)
            self._fit = (key, fit_stats(self.gram_at(ls), self.run.n, s, e))
        return self._fit[1]

    def _note(self, compute_s: float, comm_s: float, nbytes: int) -> None:
        a = self._acc
        a["passes"] += 1
        a["compute_s"] += compute_s
        a["comm_s"] += comm_s
        a["payload"] += nbytes

    def _futile(self, theta: np.ndarray) -> bool:
        """Return whether a line-search trial is refused before its pass over the rows.

        Too long (a move past MAX_LOG_MOVE), or too short: a trial whose first-order decrease
        g . (trial - accepted) is below MIN_LS_DECREASE of the objective is lost in its
        rounding, so near the optimum the halving line search ends without spending up to
        ``max_ls`` passes on steps that cannot matter (30 passes at 100k rows, measured).
        """
        f, g = self.lbfgs.f, self.lbfgs.g
        if f is None or g is None or self.theta is None:
            return False                    # the first evaluation: the accepted point itself
        move = theta - self.theta
        if np.abs(move).max() > MAX_LOG_MOVE:
            return True
        return abs(float(g @ move[self.free])) < MIN_LS_DECREASE * max(1.0, abs(f))

    def objective(self, free_theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Return (-LML / n, its gradient) over the free hyperparameters; collective."""
        assert self.theta is not None
        theta = self.theta.copy()
        theta[self.free] = free_theta
        if not np.all(np.abs(theta) <= LOG_BOUND) or self._futile(theta):
            return math.inf, np.zeros(free_theta.size)
        if self.fused:
            self.gram_at(np.exp(theta[:-2]), with_dls=True)
        try:
            fit = self.fit_at(theta)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros(free_theta.size)   # A not positive definite: the line search backs off
        grad = np.zeros(theta.size)
        grad[-2:] = fit.grad_se
        if self.fused:
            assert self._dstats is not None and self._dstats[0] == np.exp(theta[:-2]).tobytes()
            grad[0] = shared_lengthscale_grad(self._dstats[1], fit)
        elif self.free[:-2].any():
            ls = np.exp(theta[:-2])
            t0 = time.perf_counter()
            parts = [lengthscale_grad_rows(x, y, self.omega, self.b, ls, fit)
                     for x, y in zip(self._chunks(self.X), self._chunks(self.y))]
            arr = np.array(parts) if parts else np.empty((0, self.n_ls))
            t1 = time.perf_counter()
            grad[:-2] = exact_vector_sum(self.run.comm, arr, self.n_chunks)
            self._note(t1 - t0, time.perf_counter() - t1, arr.shape[1] * 8)
        n = self.run.n
        return -fit.lml / n, -grad[self.free] / n

    # -- the contract -----------------------------------------------------------------------
    def step(self) -> StepRecord:
        from mpi4py import MPI

        from fleetmpi.engine.h5rows import row_fingerprint
        run = self.run
        self._acc = {"passes": 0, "payload": 0, "compute_s": 0.0, "comm_s": 0.0}
        if self.theta is None:
            self._setup()
        assert self.theta is not None
        lr = 0.0
        if self.free.any() and not self.solved:
            before = self.lbfgs.f
            params = self.theta[self.free].copy()
            loss, moved = self.lbfgs.step(params, self.objective)
            self.theta[self.free] = params
            lr = self.lbfgs.last_step
            small = before is not None and abs(before - loss) <= F_RTOL * max(1.0, abs(loss))
            self.solved = not moved or small
        else:
            self.solved = True
        try:
            fit = self.fit_at(self.theta)          # the posterior at the accepted theta, on every rank
        except np.linalg.LinAlgError:
            raise TrainingFailed(f"gp: the posterior at hyperparameters {np.exp(self.theta).tolist()} is not "
                                 "positive definite; set model.noise to a larger number") from None
        loss = -fit.lml / run.n
        passes = int(self._acc["passes"])
        run.samples_seen += passes * run.n
        signal = float(run.comm.allreduce(run.stop_signal, op=MPI.SUM))
        return StepRecord(loss=loss, lr=lr, samples=passes * run.n, batch_fp=row_fingerprint(0, run.n),
                          cursor=run.cursor, compute_s=self._acc["compute_s"], comm_s=self._acc["comm_s"],
                          payload_bytes=int(self._acc["payload"]), wire_bytes=float(self._acc["payload"]),
                          signal=signal, solved=self.solved)

    def model(self) -> GpModel:
        """Return the fitted model at the current hyperparameters (local; the last step made its fit)."""
        assert self.theta is not None and self._fit is not None and self._fit[0] == self.theta.tobytes()
        fit = self._fit[1]
        return GpModel(self.kernel, self.omega, self.b, self.theta.copy(), fit.mean_w, fit.chol,
                       self.y_mean, self.y_std)

    def state(self) -> dict[str, np.ndarray]:
        # Every rank holds the same state (exact sums); rank 0's copy is the checkpoint's.
        if self.run.rank != 0 or self.theta is None or self._gram is None:
            return {}
        return {"gp_theta": self.theta, "gp_norm": np.array([self.y_mean, self.y_std, self.y_bound]),
                "gp_gram": self._gram[1], "gp_gram_ls": np.frombuffer(self._gram[0], np.float64),
                "gp_solved": np.array([int(self.solved)]), **self.lbfgs.state()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "gp_theta" not in arrays:
            return
        theta = np.array(arrays["gp_theta"], np.float64)
        k = self.n_ls + 2
        gram = np.array(arrays.get("gp_gram", np.empty(0)), np.float64)
        if theta.shape != (k,) or gram.shape != (self.D + 1, self.D + 1):
            raise BadInput(f"{self.run.resumed_from}: gp state has theta {theta.shape} and Gram {gram.shape}; "
                           f"the model needs ({k},) and ({self.D + 1}, {self.D + 1})")
        self.theta = theta
        self.y_mean, self.y_std, self.y_bound = (float(v) for v in arrays["gp_norm"])
        self.y = (self.y_raw - self.y_mean) / self.y_std
        self._gram = (np.array(arrays["gp_gram_ls"], np.float64).tobytes(), gram)
        self.solved = bool(int(arrays["gp_solved"][0]))
        self.lbfgs.load_state(arrays)
        try:
            self.fit_at(self.theta)                   # local: the Gram at theta's lengthscales is stored
        except np.linalg.LinAlgError:
            raise BadInput(f"{self.run.resumed_from}: gp state is not positive definite; the checkpoint is damaged") from None

    def eval_sums(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        # valid_loss is half the squared error in y's units, as for linear regression.
        return 0.5 * self.model().valid_sums(X, y)["mse"], 0.0

    def extra_valid(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        sums = self.model().valid_sums(X, y)
        return {"valid_mse": sums["mse"], "valid_nlpd": sums["nlpd"]}

    def model_meta(self) -> dict[str, Any]:
        return {"kind": "gp", "task": "regression", "d": self.run.d, **self.cfg}

    def write_model(self, path: Path, meta: dict[str, Any]) -> None:
        self.model().write(path, meta)
