"""The contract of a gradient sync and its byte accounting."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Sync(ABC):
    """Sum gradient sums (and a few float64 extras) over the ranks of ``comm``.

    Accounting, per call, for this rank:
    ``payload_bytes``: bytes this rank hands to MPI for the exchange;
    ``wire_bytes``: an estimate of the bytes this rank sends on the wire (the ring model's
    2(P-1)/P * n for an allreduce of n bytes; exact sent bytes for sparse exchanges).
    """

    kind: str

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

    def _count(self, payload: int, wire: float) -> None:
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
