"""The data-parallel tree learner under real mpiexec at 1, 2 and 3 ranks: the same trees bit for bit.

Every rank regenerates the seeded data, keeps its contiguous share of the rows, agrees
on the cut points from a seeded sample gathered from the ranks that hold it, and grows a
few rounds with MPI reducers. Rank 0 writes every ensemble array to an .npz; the test
compares the files of all rank counts with np.array_equal.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import mpirun

SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    from mpi4py import MPI
    from fleetmpi.models.trees import TreeLearner, TreeParams, cut_sample_ids, gather_sample, mpi_reducers
    from kernels import trees as K

    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    out, task, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    n, d = 1501, 9
    rng = np.random.default_rng(11)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, 4] = np.round(X[:, 4])
    z = X[:, 0] - X[:, 1] * X[:, 2] + 0.3 * rng.standard_normal(n).astype(np.float32)
    y = {"regression": z, "binary": (z > 0).astype(np.float32),
         "multiclass": np.digitize(z, [-0.5, 0.5]).astype(np.float32)}[task].astype(np.float32)
    lo, hi = rank * n // P, (rank + 1) * n // P            # contiguous shares
    ids = np.arange(lo, hi, dtype=np.int64)
    p = TreeParams(kind=kind, task=task, classes=3, trees=4, depth=5, learning_rate=0.3, bins=63, l2=1.0,
                   min_child_weight=1.0, row_sample=0.8 if kind == "gbdt" else 1.0,
                   col_sample=0.7 if kind == "gbdt" else 1.0, seed=5)
    sample = gather_sample(X[lo:hi], ids, cut_sample_ids(n, 700, p.seed), comm.allgather)
    cuts, ncuts = K.cut_points(sample, p.bins)
    reduce, reduce_max = mpi_reducers(comm)
    learner = TreeLearner(p, cuts, ncuts, reduce, reduce_max)
    pred = np.tile(learner.init_base(y[lo:hi]), (hi - lo, 1))
    codes = K.bin_rows(X[lo:hi], cuts, ncuts)
    for _ in range(p.trees):
        learner.fit_round(codes, y[lo:hi], pred, ids)
    preds = comm.gather(pred, root=0)
    if rank == 0:
        st = learner.ensemble.state()
        np.savez(out, pred=np.concatenate(preds), raw=learner.ensemble.raw(X), **st)
''')


@pytest.mark.parametrize("task,kind", [("binary", "gbdt"), ("multiclass", "gbdt"), ("regression", "gbdt"),
                                       ("binary", "forest")])
def test_same_trees_at_every_rank_count(tmp_path: Path, task: str, kind: str) -> None:
    script = tmp_path / "trees.py"
    script.write_text(SCRIPT)
    got = {}
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}.npz"
        proc = mpirun(ranks, script, str(out), task, kind)
        assert proc.returncode == 0, proc.stderr
        with np.load(out) as f:
            got[ranks] = {k: f[k] for k in f.files}
    one = got[1]
    assert int(one["round"]) == 4
    assert (one["feature"] >= 0).sum() >= 12, "the trees should split"
    assert np.array_equal(one["pred"], one["raw"])
    for ranks in (2, 3):
        assert got[ranks].keys() == one.keys()
        for name, arr in one.items():
            assert np.array_equal(got[ranks][name], arr), f"{name} differs between 1 and {ranks} ranks"
