"""The closed_form technique: one pass of exact sufficient statistics, then a Cholesky solve.

Any model that is a ``StatsProvider`` fits: it maps rows to feature rows (``features``)
and turns the summed statistics into parameters (``solve``). Kind ``ar``
(``fleetmpi.models.ar``) is one; a random-feature GP can be another (features: its random
Fourier map; solve: its regularised normal equations).

The one step reads this rank's contiguous share of the training rows, forms Z = [Phi, y]
and sums [Z_i, 1] (outer) Z_i over all rows of all ranks: Phi^T Phi, Phi^T y, y^T y and
the column sums. The sum is exact and order-independent: every row's products are rounded
once to int64 fixed point at a power-of-two scale from the global max-abs bound and row
count (``kernels.exact.fixed_scale``, so no int64 sum can overflow), added in int64 and
reduced with one integer Allreduce. The statistics, and so the parameters every rank
solves for, are bitwise the same at any rank count. The fit is then done: the technique
returns a StepRecord with ``solved`` set, and the worker ends the phase with outcome "solved".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fleetmpi.engine.technique import StepRecord, Technique
from fleetmpi.errors import BadInput, TrainingFailed
from kernels import exact

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer


@runtime_checkable
class StatsProvider(Protocol):
    """A model that closed_form can fit: feature rows, and parameters from their summed statistics."""

    l2: float

    def features(self, X: np.ndarray) -> np.ndarray:
        """Return float64 (n, k) feature rows Phi of the float32 (n, d) rows X; row i from row i only."""

    def solve(self, gram: np.ndarray, rhs: np.ndarray, n: int) -> np.ndarray:
        """Return the flat float64 parameters from sum Phi^T Phi (k, k), sum Phi^T y (k,) over n rows."""


def exact_gram(comm: Any, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (sum Z^T Z (k, k), column sums of Z (k,), global row count) over all ranks, bitwise exact; collective.

    Why not the gp's ``exact_gram`` (``fleetmpi.engine.gp``): that one rounds each global
    chunk's BLAS Gram once, which is exact only when every rank holds whole 1,024-row chunks;
    here ranks split windows at any row (``contiguous_share``, the same reads as the gradient
    techniques) and k is a few lags, so every row's products are rounded (numba, O(n k^2)).
    """
    from mpi4py import MPI
    Z = np.ascontiguousarray(Z, dtype=np.float64)
    k = Z.shape[1]
    local = np.array([exact.row_bound(Z, Z) if len(Z) else 0.0, float(len(Z))])
    glob = np.empty(2)
    comm.Allreduce(local[:1], glob[:1], op=MPI.MAX)
    comm.Allreduce(local[1:], glob[1:], op=MPI.SUM)
    if not np.isfinite(glob[0]):
        raise TrainingFailed("the rows' statistics are not finite (NaN or inf in the data)")
    n = int(glob[1])
    scale = exact.fixed_scale(float(glob[0]), n)
    acc = np.zeros((k + 1) * k, np.int64)
    exact.fixed_accumulate(Z, Z, scale, acc)
    tot = np.empty_like(acc)
    comm.Allreduce(acc, tot, op=MPI.SUM)
    stats = tot.astype(np.float64).reshape(k + 1, k) * (1.0 / scale)   # 1/scale is a power of two: exact
    return stats[:k], stats[k], n


class ClosedForm(Technique):
    """Fit a ``StatsProvider`` model in one collective step (see the module docstring)."""

    name = "closed_form"

    def __init__(self, run: Trainer) -> None:
        super().__init__(run)
        from fleetmpi.models import build_model
        sp = run.spec
        self.model: Any = build_model(sp.model, run.d, run.classes)
        if not isinstance(self.model, StatsProvider):
            raise BadInput(f"{run.jd.spec}: optimizer.kind closed_form needs a model with features and solve "
                           f"(kind ar); model kind {sp.model.kind!r} has none")
        self.params = np.zeros(self.model.n_params)
        self.solved = False

    def step(self) -> StepRecord:
        from fleetmpi.engine.h5rows import contiguous_share, row_fingerprint
        run = self.run
        t0 = time.perf_counter()
        lo, hi = contiguous_share(run.n, run.rank, run.size)
        X, y = run.reader.read_contiguous(lo, hi)
        Phi = self.model.features(X)
        Z = np.empty((len(y), Phi.shape[1] + 1))
        Z[:, :-1] = Phi
        Z[:, -1] = y
        t1 = time.perf_counter()
        S, _colsum, n = exact_gram(run.comm, Z)
        t2 = time.perf_counter()
        k = Phi.shape[1]
        try:
            self.params = self.model.solve(S[:k, :k], S[:k, k], n)
        except ValueError as e:
            raise TrainingFailed(str(e)) from None
        w = self.params[:k]
        # The objective at the solution from the same statistics: mean 0.5 r^2 (+ the l2 term).
        sse = float(S[k, k] - 2.0 * w @ S[:k, k] + w @ S[:k, :k] @ w)
        loss = 0.5 * max(sse, 0.0) / n + 0.5 * self.model.l2 * float(np.sum(self.model.weight_mask() * self.params ** 2))
        from mpi4py import MPI
        signal = run.comm.allreduce(run.stop_signal, op=MPI.SUM)
        self.solved = True
        rec = StepRecord(loss=loss, lr=0.0, samples=n, batch_fp=row_fingerprint(0, run.n), cursor=run.cursor,
                         compute_s=(t1 - t0) + (time.perf_counter() - t2), comm_s=t2 - t1,
                         payload_bytes=8 * ((k + 2) * (k + 1) + 2), wire_bytes=float(8 * ((k + 2) * (k + 1) + 2)),
                         signal=float(signal), solved=True)
        run.cursor += n
        run.samples_seen += n
        return rec

    def state(self) -> dict[str, np.ndarray]:
        if self.run.rank != 0:
            return {}
        return {"params": self.params, "closed_form_solved": np.array([int(self.solved)], np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        params = np.array(arrays["params"], dtype=np.float64)
        if params.shape != (self.model.n_params,):
            raise BadInput(f"{self.run.resumed_from}: params have shape {params.shape} but the model needs "
                           f"({self.model.n_params},)")
        self.params = params
        self.solved = bool(np.asarray(arrays.get("closed_form_solved", [0])).ravel()[0])

    def eval_sums(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return self.model.eval_sums(X, y, self.params)   # type: ignore[no-any-return]

    def model_meta(self) -> dict[str, Any]:
        return self.model.meta()   # type: ignore[no-any-return]

    def write_model(self, path: Path, meta: dict[str, Any]) -> None:
        from fleetmpi.h5store import write_h5_atomic
        write_h5_atomic(path, {"params": self.params}, {**self.model.meta(), **meta}, kind="model")
