"""Exact sync: gradient sums as fixed-point int64, identical for any rank count.

A float sum depends on how rows are split over ranks and on the reduction order. Here
``local_grad`` keeps each row's gradient factors (``Model.row_factors``), and ``reduce``

1. allgathers one small float64 record per rank: row count, a bound on the size of every
   row's contribution per tensor, then the extras;
2. picks per tensor the power-of-two scale ``kernels.exact.fixed_scale(max bound, total
   rows)``: both are global, so the scale does not depend on the rank count, and with
   it no partial or total int64 sum can overflow (|q| <= 2**62 / n per row);
3. rounds every row's contribution to int64 and adds them (``fixed_accumulate``), sums
   the int64 buffers with one ``Allreduce(MPI.INT64_T, SUM)`` (associative, so order-
   and split-free) and decodes by one multiplication with the exact power 1/scale.

So the global gradient is bitwise the same on 1, 2 or 3 ranks, and so are the
parameters after an identical optimizer step. Extras are summed in rank order from the
allgathered records: deterministic for a given rank count, and they never touch the
parameters (the loss is reported, row count and fingerprint are integers).

Without ``local_grad`` (a caller that only has a rank's gradient sum in its own array),
``reduce`` treats that sum as one row: still exact and order-free, but then the result
depends on the split of rows over ranks. Passing ``grad_out`` that way is refused: it is
the worker's dense protocol, and silently losing reproducibility there would be a bug.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from fleetmpi.errors import TrainingFailed
from fleetmpi.sync.base import Sync
from kernels import exact

_NO_U = np.empty((1, 0))


class ExactSync(Sync):
    kind = "exact"
    exact = True

    def __init__(self, comm: Any, n_params: int, n_extras: int) -> None:
        super().__init__(comm, n_params, n_extras)
        self._acc = np.empty(n_params, np.int64)
        self._sum = np.empty(n_params, np.int64)
        self._out = np.empty(n_params)
        self._staged: tuple[int, exact.Factors] | None = None
        self.scales: list[float] = []     # per tensor, of the last call
        exact.warmup()

    def local_grad(self, model: Any, X: np.ndarray, y: np.ndarray, params: np.ndarray,
                   g_out: np.ndarray) -> float:
        """Keep the rows' gradient factors for ``reduce``; return the summed loss.

        ``g_out`` is left alone: the next ``reduce`` ignores its ``grad`` argument.
        """
        loss, factors = model.row_factors(X, y, params)
        size = sum((U.shape[1] + 1) * V.shape[1] for U, V in factors)
        if size != self.n_params:
            raise ValueError(f"row factors cover {size} parameters but the sync was built for {self.n_params}")
        self._staged = (X.shape[0], factors)
        return loss

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._staged is not None:
            rows, factors = self._staged
            self._staged = None
        elif grad is self.grad_out:
            # The dense protocol (kernel writes grad_out, then reduce): its float sums depend on
            # which rows a rank holds, so the result would silently depend on the rank count.
            raise RuntimeError("exact sync: reduce() got a kernel's summed gradient without local_grad(); "
                               "call sync.local_grad(model, X, y, params, sync.grad_out) before each reduce")
        else:
            g = np.ascontiguousarray(grad, dtype=np.float64)
            if g.shape != (self.n_params,):
                raise ValueError(f"grad must have shape ({self.n_params},), got {g.shape}")
            rows, factors = 1, [(_NO_U, g.reshape(1, -1))]
        T, E = len(factors), self.n_extras
        rec = np.empty(1 + T + E)
        rec[0] = rows
        rec[1:1 + T] = [exact.row_bound(U, V) for U, V in factors]
        rec[1 + T:] = extras
        recs = np.empty((self.size, rec.size))
        self.comm.Allgather(rec, recs)
        n_rows = int(recs[:, 0].sum())
        bounds = recs[:, 1:1 + T].max(axis=0)
        if not np.all(np.isfinite(bounds)):
            bad = [i for i in range(T) if not np.isfinite(bounds[i])]
            raise TrainingFailed(f"exact sync: gradient of parameter tensor(s) {bad} is not finite "
                                 f"(bounds {bounds.tolist()}); lower optimizer.lr or raise model.l2")
        self.scales = [exact.fixed_scale(float(b), n_rows) for b in bounds]
        self._acc[:] = 0
        off = 0
        for (U, V), scale in zip(factors, self.scales):
            size = (U.shape[1] + 1) * V.shape[1]
            exact.fixed_accumulate(U, V, scale, self._acc[off:off + size])
            off += size
        self.comm.Allreduce([self._acc, MPI.INT64_T], [self._sum, MPI.INT64_T], op=MPI.SUM)
        off = 0
        for (U, V), scale in zip(factors, self.scales):
            size = (U.shape[1] + 1) * V.shape[1]
            np.multiply(self._sum[off:off + size], 1.0 / scale, out=self._out[off:off + size])
            off += size
        ints = self._acc.nbytes
        self._count(ints + rec.nbytes, 2.0 * (self.size - 1) / self.size * ints + (self.size - 1) * rec.nbytes)
        return self._out, recs[:, 1 + T:].sum(axis=0)
