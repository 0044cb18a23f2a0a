"""Sparse sync: send only the gradient entries of the features some rank's rows touched.

On CSR rows (``kernels.sparse.CsrBatch``) the gradient of a (d + 1, k) model is zero at
every feature no row of the batch holds. Per call:

1. one ``Allgather`` of a float64 record per rank: its count m of touched features, then
   the extras (so the extras' sums come with it);
2. the union of the touched features, by the cheaper of two exchanges (every rank knows
   the counts, so all pick alike): an ``Allgatherv`` of the int32 id lists (each rank's
   list reaches P - 1 peers: (P - 1) * 4 * sum(m) bytes in all) or an ``Allreduce(BOR)``
   of a d-bit bitmap (about 2 (P - 1) * d / 8 bytes in all);
3. one ``Allreduce`` of the float64 gradient rows of the union (k values each) and the
   k biases, scattered back into a dense gradient whose other entries are zero.

The union is sorted, so on 2 ranks the result is bitwise what dense sync gives; the
reduction order of larger rank counts follows MPI, as for dense. ``payload_bytes`` is
what this rank hands to MPI (record + ids or bitmap + values), ``wire_bytes`` the
estimate for what it sends (allgather: (P-1) x its block; allreduce: 2 (P-1)/P x buffer).
On one rank nothing is exchanged: ``reduce`` returns the rank's own gradient buffer (the
bytes are counted as the exchange would hand them to MPI). On CSR rows the kernels clear
only the rows the last batch wrote (``CsrGrad``), the result's untouched rows are cleared
the same way, and ``touched`` names the union. Dense X works too (touched = its nonzero
columns); a model whose parameters are not one (d + 1, k) table (mlp, a custom class) is
refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from fleetmpi.errors import BadInput
from fleetmpi.sync.base import SPARSE_SYNC_KINDS, CsrGrad, Sync
from kernels import sparse

__all__ = ["SPARSE_SYNC_KINDS", "SparseSync"]


class SparseSync(Sync):
    kind = "sparse"

    def __init__(self, comm: Any, n_params: int, n_extras: int) -> None:
        super().__init__(comm, n_params, n_extras)
        self._record = np.empty(1 + n_extras)
        self._records = np.empty((self.size, 1 + n_extras))
        self._out = np.zeros(n_params)
        self._out_rows: np.ndarray | None = None  # the features _out holds values at (None: none yet)
        self._cols: np.ndarray | None = None     # this rank's touched features of the staged batch
        self._d = self._k = 0
        self._csr = CsrGrad(n_params)
        self.union_size = 0                       # features sent in the last call
        self.exchange = ""                        # "ids" or "bitmap": how the last union was formed
        sparse.warmup()

    def _layout(self, model: Any, d: int) -> None:
        """Learn d and k from the first batch; BadInput for a model that is not a (d + 1, k) table."""
        if self._d == d:
            return
        kind = getattr(model, "kind", "?")
        if kind not in SPARSE_SYNC_KINDS or self.n_params % (d + 1):
            raise BadInput(f"sync kind sparse sends a (features + 1) x classes gradient table; model kind {kind!r} "
                           f"has another layout: use it with kind {', '.join(SPARSE_SYNC_KINDS)}, or sync dense")
        self._d, self._k = d, self.n_params // (d + 1)
        self._out[...] = 0.0
        self._out_rows = None

    def local_grad(self, model: Any, X: Any, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        """Fill g_out with this rank's gradient sum and note the features its rows touch; return the loss sum."""
        self._layout(model, X.shape[1])
        if g_out is self.grad_out and self._csr.fits(model, X):
            loss, self._cols = self._csr.grad(model, X, y, params, g_out)
            return loss
        self._csr.forget()
        loss = float(model.loss_grad_sum(X, y, params, g_out))
        if isinstance(X, sparse.CsrBatch):
            self._cols = np.unique(X.indices)
        else:
            self._cols = np.flatnonzero(np.any(X != 0, axis=0)).astype(np.int32)
        return loss

    def reduce(self, grad: np.ndarray, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._cols is None:
            raise RuntimeError("sparse sync: reduce() needs local_grad() first (it notes the touched features)")
        cols, self._cols = self._cols, None
        if grad is not self.grad_out:
            self._csr.forget()     # the next CSR batch clears all of grad_out
        P, d, k = self.size, self._d, self._k
        if P == 1:
            return self._one_rank(grad, extras, cols)
        self._record[0] = cols.size
        self._record[1:] = extras
        self.comm.Allgather(self._record, self._records)
        counts = self._records[:, 0].astype(np.int64)
        ex = self._records[:, 1:].sum(axis=0)
        total = int(counts.sum())
        nbits = -(-d // 8)
        payload, wire = self._record.nbytes, float((P - 1) * self._record.nbytes)
        # All ranks' ids cost (P-1) * 4 * total bytes on the wire, the bitmap about 2 (P-1) * nbits.
        union: np.ndarray
        if 4 * total <= 2 * nbits or P == 1:
            displs = np.zeros_like(counts)
            np.cumsum(counts[:-1], out=displs[1:])
            recv = np.empty(max(total, 1), np.int32)
            self.comm.Allgatherv([cols, MPI.INT32_T], [recv, (counts, displs), MPI.INT32_T])
            union = np.unique(recv[:total])
            payload += cols.nbytes
            wire += (P - 1) * cols.nbytes
            self.exchange = "ids"
        else:
            mine = np.zeros(d, np.bool_)
            mine[cols] = True
            bits = np.packbits(mine)
            both = np.empty_like(bits)
            self.comm.Allreduce([bits, MPI.BYTE], [both, MPI.BYTE], op=MPI.BOR)
            # int32 like the ids exchange's union: the row-update kernels are precompiled for int32 rows
            union = np.flatnonzero(np.unpackbits(both, count=d)).astype(np.int32)
            payload += bits.nbytes
            wire += 2.0 * (P - 1) / P * bits.nbytes
            self.exchange = "bitmap"
        G = np.ascontiguousarray(grad, dtype=np.float64).reshape(d + 1, k)
        u = union.size
        send = np.empty((u + 1) * k)
        send[:u * k] = G[union].ravel()
        send[u * k:] = G[d]
        recv_v = np.empty_like(send)
        self.comm.Allreduce(send, recv_v, op=MPI.SUM)
        out = self._out.reshape(d + 1, k)
        if self._out_rows is not None:
            out[self._out_rows] = 0.0       # only what the last call wrote (the bias row is overwritten)
        out[union] = recv_v[:u * k].reshape(u, k)
        self._out_rows = self.touched = union
        out[d] = recv_v[u * k:]
        payload += send.nbytes
        wire += 2.0 * (P - 1) / P * send.nbytes
        self.union_size = u
        self._count(payload, wire)
        return self._out, ex

    def _one_rank(self, grad: np.ndarray, extras: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return this rank's own sums, copying nothing; count the bytes the exchange would hand to MPI."""
        u = cols.size
        self.exchange, self.union_size = "ids", u
        self._count(self._record.nbytes + cols.nbytes + (u + 1) * self._k * 8, 0.0)
        if grad is self.grad_out:
            self.touched = cols
            return grad, extras.copy()
        G = np.ascontiguousarray(grad, dtype=np.float64).reshape(self._d + 1, self._k)
        out = self._out.reshape(self._d + 1, self._k)
        if self._out_rows is not None:
            out[self._out_rows] = 0.0
        out[cols] = G[cols]
        out[self._d] = G[self._d]
        self._out_rows = self.touched = cols
        return self._out, extras.copy()
