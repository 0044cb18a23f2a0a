"""The contract of a gradient sync and its byte accounting."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple

import numpy as np


class Extra(IntEnum):
    """Position of each float64 extra summed with the gradient (the sync's send layout, after it).

    LOSS comes first: a GPU gradient kernel writes [gradient sum | loss sum] straight into
    the dense send buffer, and the other extras follow from the host.
    """

    LOSS = 0        # summed loss over the rows (no L2)
    ROWS = 1        # rows this rank contributed
    BATCH_FP = 2    # fingerprint of the rows (a sum of integers, exact in float64)
    SIGNAL = 3      # 1 where a stop signal reached the rank: summed, a count of ranks


N_EXTRAS = len(Extra)


class Extras(NamedTuple):
    """The extras of one sync call, by name: this rank's on the way in, their global sums out.

    A NamedTuple (immutable, built once or twice a step): 0.3 us where a frozen dataclass took 1.3.
    """

    loss: float
    rows: float
    batch_fp: float
    signal: float

    def array(self) -> np.ndarray:
        """Return the float64 send layout (``Extra`` order)."""
        return np.array([self.loss, self.rows, self.batch_fp, self.signal])

    @classmethod
    def of(cls, ex: np.ndarray) -> Extras:
        """Return the extras held in a reduced float64 array in ``Extra`` order."""
        return cls._make(ex.tolist())   # Extra order is the field order (test_technique)


class Sync(ABC):
    """Sum gradient sums (and a few float64 extras) over the ranks of ``comm``.

    Accounting, per call, for this rank:
    ``payload_bytes``: bytes this rank hands to MPI for the exchange;
    ``wire_bytes``: an estimate of the bytes this rank sends on the wire (the ring model's
    2(P-1)/P * n for an allreduce of n bytes; exact sent bytes for sparse exchanges).
    """

    kind: str
    # Whether the sum is bitwise independent of the rank count (it needs each row, not a
    # kernel's summed gradient): the one way the engine asks "is this exact sync?".
    exact: ClassVar[bool] = False

    def __init__(self, comm: Any, n_params: int, n_extras: int) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self.n_params, self.n_extras = n_params, n_extras
        self.payload_bytes = 0
        self.wire_bytes = 0.0
        self.payload_total = 0
        self.wire_total = 0.0
        self.calls = 0
        # Where kernels write this rank's gradient sum; a sync may make it a view of its
        # send buffer so that reduce() copies nothing.
        self.grad_out = np.empty(n_params)
        # Set by the caller before ``reduce`` (the same on every rank): True when it needs
        # this call's LOSS, ROWS and BATCH_FP only eventually (SGD's per-step record), not
        # now (a line search's objective). A sync may then hold them back and return the
        # sums over several calls at once, with zeros in the calls between (ROWS = 0 says
        # "none this call"); SIGNAL and a non-finite loss always come back at once.
        self.defer_extras = False
        # Set by reduce(): the feature rows of a (d + 1, k) gradient table outside which (and
        # its bias row d) the returned gradient is +0.0 (the CSR rows' touched features, in no
        # particular order), or None where that is not known. SGD updates only these rows
        # where that is exact (``SGD.apply_sum``).
        self.touched: np.ndarray | None = None

    def _count(self, payload: int, wire: float) -> None:
        """Record one call's bytes: ``payload`` handed to MPI (B), ``wire`` estimated on the wire (B)."""
        self.payload_bytes, self.wire_bytes = payload, wire
        self.payload_total += payload
        self.wire_total += wire
        self.calls += 1

    def local_grad(self, model: Any, X: np.ndarray, y: np.ndarray, params: np.ndarray,
                   g_out: np.ndarray) -> float:
        """Fill g_out with this rank's gradient sum over the rows of X; return the summed loss.

        Not collective. A sync that needs more than the summed gradient (exact: each row's
        contribution) overrides it and keeps what its next ``reduce`` needs.
        """
        return float(model.loss_grad_sum(X, y, params, g_out))

    @abstractmethod
    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (global gradient sum, global extras sum); collective over ``comm``.

        Every rank calls it with ``grad`` of n_params float64 (this rank's gradient sum) and
        ``extras`` of n_extras float64 (``Extra`` layout for the engine); every rank gets the
        same sums back. Counts this call's bytes (``payload_bytes``, ``wire_bytes``).
        Pass ``grad_out`` as ``grad`` to skip a copy. The results may be views into the
        sync's buffers, valid until the next call.
        """

    def gather_state(self) -> dict[str, np.ndarray]:
        """Return this sync's state merged over all ranks, on rank 0 ({} elsewhere).

        Collective. Per-rank state (e.g. compression residuals) must be combined so that a
        checkpoint taken at P ranks can be spread over any other rank count on load.
        """
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Take this rank's share of merged state from a checkpoint's arrays (every rank)."""


# Built-in kinds whose parameters are one (d + 1, k) table with a zero gradient at untouched features.
SPARSE_SYNC_KINDS = ("linear", "logistic", "softmax")


class CsrGrad:
    """A rank's gradient sum of CSR rows into a (d + 1, k) table that clears only what it last wrote.

    The kernels would zero the whole buffer (12.6 MB for 2^18 features x 6 classes) per
    batch; the previous batch wrote only its touched rows and the bias row, so only they
    are cleared. A sync whose buffer someone else wrote calls ``forget()`` (next batch
    clears all).
    """

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.d = self.k = 0
        self._seen = np.zeros(0, np.bool_)
        self._ids = np.empty(0, np.int32)
        self._dirty: np.ndarray | None = None   # rows that may be nonzero in the buffer; None: any

    def fits(self, model: Any, X: Any) -> bool:
        """Return whether X is CSR rows and the model a built-in (d + 1, k) table (learns d and k)."""
        if isinstance(X, np.ndarray):   # dense rows, every step of most runs: no import statement (0.5 us)
            return False
        from kernels.sparse import CsrBatch
        if not isinstance(X, CsrBatch) or getattr(model, "kind", None) not in SPARSE_SYNC_KINDS:
            return False
        d = X.shape[1]
        if self.n_params % (d + 1):
            return False
        if d != self.d:
            self.d, self.k, self._dirty = d, self.n_params // (d + 1), None
            self._seen = np.zeros(d, np.bool_)
        return True

    def grad(self, model: Any, X: Any, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> tuple[float, np.ndarray]:
        """Fill g_out (after ``fits``) with the rows' gradient sum; return (loss sum, touched features)."""
        from kernels import sparse, update
        if self._dirty is None:
            loss = float(model.loss_grad_sum(X, y, params, g_out))
        else:
            update.clear_rows(g_out, self._dirty, self.k)
            loss = float(model.loss_grad_sum(X, y, params, g_out, zeroed=True))
        if self._ids.size < min(X.nnz, self.d):
            self._ids = np.empty(min(max(X.nnz, 2 * self._ids.size), self.d), np.int32)
        m = sparse.mark_columns(X.indices, self._seen, self._ids)
        cols = self._dirty = self._ids[:m].copy()
        return loss, cols

    def forget(self) -> None:
        """The buffer was written outside ``grad``: the next batch clears all of it."""
        self._dirty = None
