"""The CSR fast paths of a step (clear only the last batch's rows, no copy on one rank, update
only the touched rows) give bit for bit the parameters of the plain path, under real mpiexec."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import mpirun

pytestmark = pytest.mark.slow

# Each step: this rank's random CSR rows (a few columns, changing from step to step, some
# steps touching columns no other rank does). The fast path is what FlatState runs: the
# sync's own buffer, its ``touched`` rows, the optimizer's one-pass update. The reference
# zeroes a fresh buffer per step (the kernel's full clear), reduces a copy (so the sync
# cannot reuse anything), and updates with the numpy sequence the kernels replace.
SCRIPT = '''
import sys
import numpy as np
from mpi4py import MPI
from fleetmpi.models import SoftmaxRegression
from fleetmpi.optim import SGD, Adagrad
from fleetmpi.optim.adagrad import EPS
from fleetmpi.spec import OptimizerSpec
from fleetmpi.sync import DenseSync, ExactSync, SparseSync
from kernels.sparse import CsrBatch

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
d, k, B = 3000, 4, 12

def batch(step):
    rng = np.random.default_rng([step, rank])
    n = B // P + (rank < B % P)
    density = 0.002 if step % 3 else 0.02          # ids exchange, then bitmap (sparse sync)
    X = np.where(rng.random((n, d)) < density, rng.standard_normal((n, d)), 0.0).astype(np.float32)
    X[:, rng.integers(0, d, 5)] = 0.0
    return CsrBatch.from_dense(X), rng.integers(0, k, n).astype(np.float32)

def reference_update(kind, p, state, g, l2, mask, lr, mu):
    grad = g / B
    if l2:
        grad += l2 * mask * p
    if kind == "adagrad":
        state += grad * grad
        p -= lr * (grad / (np.sqrt(state) + EPS))
    elif mu:
        state *= mu
        state += grad
        p -= lr * state
    else:
        p -= lr * grad

fast_rows = 0
for sync_cls in (DenseSync, SparseSync, ExactSync):
    for kind, l2, mu in (("sgd", 0.0, 0.0), ("adagrad", 0.0, 0.0), ("sgd", 1e-3, 0.9), ("adagrad", 1e-3, 0.0)):
        model = SoftmaxRegression(d, k, l2)
        mask = model.weight_mask()
        spec = OptimizerSpec(kind=kind, lr=0.3, momentum=mu, batch=B)
        p0 = np.random.default_rng(5).normal(0.0, 0.1, (d + 1) * k)
        p, q = p0.copy(), p0.copy()
        opt = (Adagrad if kind == "adagrad" else SGD)(spec, p.size)
        state = np.zeros(p.size)
        fast, ref = sync_cls(comm, p.size, 4), sync_cls(comm, p.size, 4)
        for step in range(7):
            X, y = batch(step)
            ex = np.array([0.0, float(len(y)), 0.0, 0.0])
            fast.local_grad(model, X, y, p, fast.grad_out)
            g, _ = fast.reduce(fast.grad_out, ex)
            if fast.touched is not None:
                fast_rows += 1
                G = g.reshape(d + 1, k)
                off = np.setdiff1d(np.arange(d), fast.touched)
                assert not G[off].any(), "a row outside touched holds a gradient"
            opt.apply_sum(p, g, B, l2, mask, 0.3, fast.touched, k)
            buf = np.full(q.size, np.nan)
            ref.local_grad(model, X, y, q, buf)
            gr, _ = ref.reduce(buf.copy(), ex)
            reference_update(kind, q, state, gr.copy(), l2, mask, 0.3, mu)
            assert np.array_equal(p, q), (sync_cls.kind, kind, l2, mu, step, np.abs(p - q).max())
        all_p = comm.allgather(p)
        assert all(np.array_equal(a, p) for a in all_p), "ranks hold different parameters"
counts = comm.gather(fast_rows)
if rank == 0:
    print("ok", *counts)
'''


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_fast_csr_steps_equal_the_plain_steps_bit_for_bit(tmp_path: Path, ranks: int) -> None:
    script = tmp_path / "steps.py"
    script.write_text(SCRIPT)
    proc = mpirun(ranks, script, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [int(c) for c in proc.stdout.split("ok", 1)[1].split()]
    # touched rows come back on one rank (dense and sparse sync) and from sparse sync on more
    assert counts == [56 if ranks == 1 else 28] * ranks, proc.stdout
