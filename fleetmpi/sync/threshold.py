"""Threshold sync: send only +-tau per large residual entry, keep the rest (Strom 2015).

Per call, each rank adds its gradient sum to its residual and packs the entries with
``|r| >= tau`` (``kernels.compress``); one ``Allgather`` of a small float64 record
(entry count, then the extras) tells every rank the counts and sums the extras, one
``Allgatherv`` of packed entries moves the gradient, and every rank decodes the same
buffer into the same global sum. Nothing is pickled. An entry is a uint16 for models of at
most 2**15 parameters (2 bytes: the softmax and MLP of the benches) and a uint32 above.

Invariant on every rank count: sum of decoded updates + sum of residuals over ranks =
sum of all gradients fed (up to float rounding). A checkpoint stores the residuals'
sum over ranks; on load rank 0 takes all of it (see ``load_state``).

Adaptive tau (``adaptive=True``): after each call every rank scales tau by
``clip(sqrt(density / target), 1/2, 2)`` where density is the fraction of entries sent,
counted over all ranks from the allgathered counts: the same numbers on every rank, so
tau stays identical everywhere without another collective.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from fleetmpi.errors import CheckpointError
from fleetmpi.sync.base import Sync
from kernels import compress

# Adaptive tau moves at most this factor per call, and stays within this range of the start.
_MAX_STEP = 2.0
_RANGE = 2.0 ** 40


class ThresholdSync(Sync):
    kind = "threshold"

    def __init__(self, comm: Any, n_params: int, n_extras: int, tau: float,
                 adaptive: bool = False, target_density: float = 0.01) -> None:
        super().__init__(comm, n_params, n_extras)
        if n_params > compress.MAX_PARAMS:
            raise ValueError(f"threshold sync addresses at most 2**31 parameters, the model has {n_params}")
        if not 0.0 < tau < np.inf:
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must lie in (0, 1], got {target_density}")
        self.tau0 = float(tau)
        self.tau = float(tau)
        self.adaptive, self.target_density = adaptive, float(target_density)
        self.residual = np.zeros(n_params)
        self.density = 0.0            # fraction of entries sent by all ranks in the last call
        self.sent_entries = 0         # entries this rank sent in the last call
        self.entry_dtype = compress.entry_dtype(n_params)
        self._mpi_entry = MPI.UINT16_T if self.entry_dtype == np.uint16 else MPI.UINT32_T
        self._packed: np.ndarray = np.empty(n_params, self.entry_dtype)
        self._record = np.empty(1 + n_extras)
        self._records = np.empty((self.size, 1 + n_extras))
        self._recv: np.ndarray = np.empty(max(n_params, 1), self.entry_dtype)
        self._out = np.empty(n_params)
        compress.warmup()

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tau = self.tau
        m = compress.encode(self.residual, np.ascontiguousarray(grad, dtype=np.float64), tau, self._packed)
        counts, displs, ex = self.exchange_counts(m, extras)
        total = int(counts.sum())
        if self._recv.shape[0] < total:
            self._recv = np.empty(total, self.entry_dtype)
        recv = self._recv[:total]
        self.comm.Allgatherv([self._packed[:m], self._mpi_entry], [recv, (counts, displs), self._mpi_entry])
        compress.decode(recv, tau, self._out)
        self.settle(m, total)
        return self._out, ex

    def exchange_counts(self, m: int, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (entries per rank, their offsets, global extras sum) from this rank's count ``m``.

        Collective: one Allgather of [m, extras...] (float64). The host and the device
        threshold syncs both call it before their Allgatherv of the packed entries.
        """
        self._record[0] = m
        self._record[1:] = extras
        self.comm.Allgather(self._record, self._records)
        counts = self._records[:, 0].astype(np.int64)
        displs = np.zeros_like(counts)
        np.cumsum(counts[:-1], out=displs[1:])
        return counts, displs, self._records[:, 1:].sum(axis=0)

    def settle(self, m: int, total: int, entry_bytes: int | None = None) -> None:
        """After a call that sent ``m`` entries here and ``total`` over all ranks: density, tau, bytes.

        Not collective, but every rank computes the same density and tau from the
        allgathered counts. ``entry_bytes``: the width of one sent entry (default: this
        sync's wire word; the device sync sends uint32).
        """
        self.sent_entries = m
        self.density = total / (self.size * self.n_params) if self.n_params else 0.0
        if self.adaptive:
            self.tau = next_tau(self.tau, self.density, self.target_density, self.tau0)
        # This rank's block reaches P-1 peers; the record is tiny but counted all the same.
        width = np.dtype(self.entry_dtype).itemsize if entry_bytes is None else entry_bytes
        payload = width * m + self._record.nbytes
        self._count(payload, float((self.size - 1) * payload))

    def gather_state(self) -> dict[str, np.ndarray]:
        """Return {"sync_residual": residuals summed over ranks, "sync_tau": [tau]} on rank 0."""
        total = np.empty_like(self.residual) if self.comm.Get_rank() == 0 else None
        self.comm.Reduce(self.residual, total, op=MPI.SUM, root=0)
        if total is None:
            return {}
        return {"sync_residual": total, "sync_tau": np.array([self.tau])}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Give rank 0 the whole merged residual and the others zeros; resume tau.

        Rank 0 takes all of it rather than 1/P each: the sum is restored bit for bit (no
        division rounding), and an entry the old ranks had jointly pushed past tau is sent
        at once instead of waiting until each 1/P share grows past tau on its own.
        """
        res = arrays.get("sync_residual")
        self.residual[:] = 0.0
        if res is not None:
            if res.shape != self.residual.shape:
                raise CheckpointError(f"checkpoint's sync_residual has shape {res.shape} but the model "
                                      f"has {self.n_params} parameters")
            if self.comm.Get_rank() == 0:
                self.residual[:] = res
        tau = arrays.get("sync_tau")
        if tau is not None and self.adaptive:
            self.tau = float(tau[0])


def next_tau(tau: float, density: float, target: float, tau0: float) -> float:
    """Return the next threshold: larger when more than ``target`` of the entries were sent."""
    if density <= 0.0:
        factor = 1 / _MAX_STEP   # tau lies above every entry: shrink it
    else:
        factor = min(max((density / target) ** 0.5, 1 / _MAX_STEP), _MAX_STEP)
    return min(max(tau * factor, tau0 / _RANGE), tau0 * _RANGE)
