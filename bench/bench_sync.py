"""Sync overhead: DenseSync.reduce vs a raw mpi4py Allreduce of the same buffer, 1 KiB..64 MiB.

Run under MPI (``mpiexec -n P python bench/bench_sync.py``); rank 0 prints the table. Both
sides are timed alternately in the same process on the same buffer sizes; the ratio is
median(DenseSync) / median(raw).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
from common import save, table

from fleetmpi.sync.dense import DenseSync

EXTRAS = 4


def _median_time(comm: MPI.Comm, fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The slowest rank decides a collective's time.
    return comm.allreduce(float(np.median(times)), op=MPI.MAX)


def main() -> None:
    comm = MPI.COMM_WORLD
    rows = []
    for kib in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536):
        n = kib * 1024 // 8 - EXTRAS
        rng = np.random.default_rng(comm.rank)
        grad, extras = rng.standard_normal(n), rng.standard_normal(EXTRAS)
        sync = DenseSync(comm, n, EXTRAS)
        sync.grad_out[...] = grad   # as the kernel leaves it: written in place, untimed
        grad = sync.grad_out
        send = np.concatenate([grad, extras])
        recv = np.empty_like(send)
        reps = max(5, min(200, int(2e8 // max(send.nbytes * 8, 1))))
        raw = lambda: comm.Allreduce(send, recv, op=MPI.SUM)
        ours = lambda: sync.reduce(grad, extras)
        raw(), ours()
        t_raw = min(_median_time(comm, raw, reps), _median_time(comm, raw, reps))
        t_ours = min(_median_time(comm, ours, reps), _median_time(comm, ours, reps))
        g, _ = sync.reduce(grad, extras)
        comm.Allreduce(send, recv, op=MPI.SUM)
        assert np.array_equal(g, recv[:n])
        rows.append({"size_KiB": kib, "raw_us": t_raw * 1e6, "dense_us": t_ours * 1e6, "ratio": t_ours / t_raw,
                     "raw_GBps": send.nbytes / t_raw / 1e9, "payload_B": sync.payload_bytes,
                     "wire_B": sync.wire_bytes})
    if comm.rank == 0:
        print(table(f"dense sync vs raw mpi4py Allreduce, {comm.size} ranks (median; ratio = dense / raw)", rows,
                    [("size_KiB", "d"), ("raw_us", ".1f"), ("dense_us", ".1f"), ("ratio", ".3f"),
                     ("raw_GBps", ".2f"), ("payload_B", "d"), ("wire_B", ".0f")]))
        save(f"sync_dense_{comm.size}ranks", rows, ranks=comm.size, mpi=MPI.Get_library_version().splitlines()[0])


if __name__ == "__main__":
    main()
