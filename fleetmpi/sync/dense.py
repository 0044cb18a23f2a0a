"""Dense sync: one Allreduce of a contiguous float64 buffer (gradient, then extras).

On one rank the sum is the rank's own: ``reduce`` hands back its gradient buffer and
copies nothing (the Allreduce would copy 8 bytes per parameter for nothing). On CSR rows
of a built-in (d + 1, k) model the kernels clear only the rows the last batch wrote
(``CsrGrad``), and on one rank the touched features come back as ``touched``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from fleetmpi.sync.base import CsrGrad, Sync


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
        self._csr = CsrGrad(n_params)
        self._cols: np.ndarray | None = None    # touched features of the batch local_grad staged

    def local_grad(self, model: Any, X: Any, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        self._cols = None
        if g_out is self.grad_out and self._csr.fits(model, X):
            loss, self._cols = self._csr.grad(model, X, y, params, g_out)
            return loss
        self._csr.forget()
        return super().local_grad(model, X, y, params, g_out)

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols, self._cols = self._cols, None
        if grad is not self.grad_out:
            self.grad_out[...] = grad
            cols = None
        if cols is None:   # the buffer was written some other way than by local_grad's CSR path
            self._csr.forget()
        self._extras_in[...] = extras
        self._count(self._send.nbytes, self._wire)
        if self.size == 1:
            # The caller reads the result until the next local_grad, which is when the
            # kernels write this buffer again.
            self._extras_res[...] = self._extras_in
            self.touched = cols
            return self.grad_out, self._extras_res
        self.touched = None
        self.comm.Allreduce(self._send, self._recv, op=MPI.SUM)
        return self._grad_res, self._extras_res
