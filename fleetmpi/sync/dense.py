"""Dense sync: one Allreduce of a contiguous float64 buffer (gradient, then extras)."""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from fleetmpi.sync.base import Sync


class DenseSync(Sync):
    kind = "dense"

    def __init__(self, comm: Any, n_params: int, n_extras: int) -> None:
        super().__init__(comm, n_params, n_extras)
        self._send = np.empty(n_params + n_extras)
        self._recv = np.empty(n_params + n_extras)
        self.grad_out = self._send[:n_params]
        self._extras_in = self._send[n_params:]
        self._grad_res, self._extras_res = self._recv[:n_params], self._recv[n_params:]
        nbytes = self._send.nbytes
        self._wire = 2.0 * (self.size - 1) / self.size * nbytes

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if grad is not self.grad_out:
            self.grad_out[...] = grad
        self._extras_in[...] = extras
        self.comm.Allreduce(self._send, self._recv, op=MPI.SUM)
        self._count(self._send.nbytes, self._wire)
        return self._grad_res, self._extras_res
