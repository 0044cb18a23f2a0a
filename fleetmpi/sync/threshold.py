"""Threshold sync: send only +-tau per large residual entry, keep the rest (Strom 2015).

Per call, each rank adds its gradient sum to its residual and writes the entries with
``|r| >= tau`` as gap varints (``kernels.compress.encode_gaps``: 1 byte an entry on the
benches' softmax). Two collectives, nothing pickled:

1. ``Allgather`` of one byte per rank: the length of its block (0..126; 127: "longer",
   then one more ``Allgather`` of the lengths as uint32/uint64), top bit set where the
   rank must report its extras now (a stop signal, a non-finite loss).
2. ``Allgatherv`` of the blocks, skipped when every block is empty; on a flush call each
   rank appends its extras (float64, ``Extra`` layout) to its block.

So a silent step (no rank crosses tau, extras held back) costs one byte per rank. Extras
go out on every call unless the caller sets ``defer_extras`` (SGD does); then each rank
sums them and sends the sums on its first deferred call (a phase's first step has its
loss) and every ``extras_every``-th after, or at once when one rank raises the top bit.
The calls between return zeros (ROWS = 0: "nothing reported"). A held-back window is
metrics only: a checkpoint does not carry it, a resumed phase starts a new one.

Bytes: ``payload_bytes`` is every rank's bytes of the call (headers, lengths, blocks,
extras) divided by the rank count, rounded up: a rank's share, not only this rank's own
(ranks send unequal blocks, and rank 0 records what the monitor shows).

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
from fleetmpi.sync.base import Extra, Sync
from kernels import compress

# Adaptive tau moves at most this factor per call, and stays within this range of the start.
_MAX_STEP = 2.0
_RANGE = 2.0 ** 40
# The compact exchange's header byte: the top bit asks for extras now, the rest is the
# block's length in bytes, _LONG meaning "longer: a second round carries the lengths".
_URGENT = 0x80
_LONG = 0x7F


class ThresholdSync(Sync):
    kind = "threshold"

    def __init__(self, comm: Any, n_params: int, n_extras: int, tau: float,
                 adaptive: bool = False, target_density: float = 0.01, extras_every: int = 1) -> None:
        super().__init__(comm, n_params, n_extras)
        if n_params > compress.MAX_PARAMS:
            raise ValueError(f"threshold sync addresses at most 2**31 parameters, the model has {n_params}")
        if not 0.0 < tau < np.inf:
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        if not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must lie in (0, 1], got {target_density}")
        self.tau0 = float(tau)
        self.tau = float(tau)
        if extras_every < 1:
            raise ValueError(f"extras_every must be an integer >= 1, got {extras_every}")
        self.adaptive, self.target_density = adaptive, float(target_density)
        self.extras_every = int(extras_every)
        self.residual = np.zeros(n_params)
        self.density = 0.0            # fraction of entries sent by all ranks in the last call
        self.sent_entries = 0         # entries this rank sent in the last call
        self.entry_dtype = compress.entry_dtype(n_params)
        self._record = np.empty(1 + n_extras)
        self._records = np.empty((self.size, 1 + n_extras))
        self._out = np.empty(n_params)
        # The compact exchange (host): this rank's block with room for its extras, the
        # byte headers, the long-block lengths, the held-back extras and what came back.
        self._ext_bytes = 8 * n_extras
        self._msg = np.empty(compress.MAX_GAP_BYTES * n_params + self._ext_bytes, np.uint8)
        self._hdr = np.zeros(1, np.uint8)
        self._hdrs = np.zeros(self.size, np.uint8)
        self._len_dtype = np.uint32 if compress.MAX_GAP_BYTES * n_params < 2 ** 32 else np.uint64
        self._len = np.zeros(1, self._len_dtype)
        self._lens = np.zeros(self.size, self._len_dtype)
        self._bytes: np.ndarray = np.empty(max(n_params, 64), np.uint8)
        self._window = np.zeros(n_extras)
        self._ex = np.zeros(n_extras)
        self._deferred = 0   # calls made with defer_extras set
        compress.warmup()

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tau, P = self.tau, self.size
        m, nb = compress.encode_gaps(self.residual, np.ascontiguousarray(grad, dtype=np.float64), tau, self._msg)
        if self.defer_extras:
            self._window += extras
        else:
            # A caller that needs every call's extras (a line search) gets exactly this call's:
            # what an SGD window held back when a rule switched over is dropped, never mixed in,
            # and SGD's first step back flushes again, so its record never shows a stale loss.
            self._window[:] = extras
            self._deferred = 0
        urgent = not np.all(np.isfinite(extras)) or (self.n_extras > Extra.SIGNAL and extras[Extra.SIGNAL] != 0)
        self._hdr[0] = (_URGENT if urgent else 0) | min(nb, _LONG)
        self.comm.Allgather([self._hdr, MPI.UINT8_T], [self._hdrs, MPI.UINT8_T])
        lens = (self._hdrs & _LONG).astype(np.int64)
        long_round = bool((lens == _LONG).any())
        if long_round:
            self._len[0] = nb
            self.comm.Allgather(self._len, self._lens)
            lens = self._lens.astype(np.int64)
        # Deferred calls flush on the first and then on every extras_every-th (calls N, 2N, ...
        # of the sync: with a log interval a multiple of N, every logged step has its own window).
        flush = (not self.defer_extras or bool((self._hdrs & _URGENT).any())
                 or self._deferred == 0 or (self._deferred + 1) % self.extras_every == 0)
        ext = self._ext_bytes if flush else 0
        if flush:
            self._msg[nb:nb + ext] = self._window.view(np.uint8)
        counts = lens + ext
        displs = np.zeros_like(counts)
        np.cumsum(counts[:-1], out=displs[1:])
        total_bytes = int(counts.sum())
        if self._bytes.shape[0] < total_bytes:
            self._bytes = np.empty(total_bytes, np.uint8)
        recv = self._bytes[:total_bytes]
        if total_bytes:
            self.comm.Allgatherv([self._msg[:nb + ext], MPI.UINT8_T], [recv, (counts, displs), MPI.UINT8_T])
        self._out[:] = 0.0
        self._ex[:] = 0.0
        total = 0
        for r in range(P):   # rank order: every rank adds the same numbers in the same order
            lo = int(displs[r])
            total += compress.decode_gaps(recv[lo:lo + int(lens[r])], tau, self._out)
            if flush:
                self._ex += np.frombuffer(recv[lo + int(lens[r]):lo + int(counts[r])].tobytes(), np.float64)
        if flush:
            self._window[:] = 0.0
        if self.defer_extras:
            self._deferred += 1
        self.sent_entries = m
        self._steer(total)
        width = np.dtype(self._len_dtype).itemsize if long_round else 0
        all_bytes = P * (1 + width) + total_bytes
        payload = -(-all_bytes // P)
        self._count(payload, float((P - 1) * payload))
        return self._out, self._ex

    def exchange_counts(self, m: int, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (entries per rank, their offsets, global extras sum) from this rank's count ``m``.

        Collective: one Allgather of [m, extras...] (float64). The device threshold sync
        calls it before its Allgatherv of packed uint32 entries (the host sync's compact
        exchange is ``reduce``).
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
        sync's wire word; the device sync sends uint32). The device sync's accounting.
        """
        self.sent_entries = m
        self._steer(total)
        # This rank's block reaches P-1 peers; the record is tiny but counted all the same.
        width = np.dtype(self.entry_dtype).itemsize if entry_bytes is None else entry_bytes
        payload = width * m + self._record.nbytes
        self._count(payload, float((self.size - 1) * payload))

    def _steer(self, total: int) -> None:
        """Set density from ``total`` entries sent over all ranks, and the next tau if adaptive."""
        self.density = total / (self.size * self.n_params) if self.n_params else 0.0
        if self.adaptive:
            self.tau = next_tau(self.tau, self.density, self.target_density, self.tau0)

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
