"""Dense sync: one Allreduce of a contiguous float64 buffer (gradient, then extras)."""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from .base import Sync


class DenseSync(Sync):
    kind = "dense"

    def __init__(self, comm: Any, n_params: int, n_extras: int) -> None:
        super().__init__(comm, n_params, n_extras)
        self._send = np.empty(n_params + n_extras)
        self._recv = np.empty(n_params + n_extras)

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_params
        self._send[:n] = grad
        self._send[n:] = extras
        self.comm.Allreduce(self._send, self._recv, op=MPI.SUM)
        nbytes = self._send.nbytes
        self._count(nbytes, 2.0 * (self.size - 1) / self.size * nbytes)
        return self._recv[:n], self._recv[n:]
