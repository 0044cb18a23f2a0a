"""CSR data end to end: `fleetmpi run` under real mpiexec with dense, sparse and exact sync."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, mpirun, run_rescaled_and_solo, write_spec

from fleetmpi.engine.csr_data import CsrReader
from fleetmpi.engine.data import SampleOrder
from fleetmpi.h5store import read_h5_verified

pytestmark = pytest.mark.slow

D, K, NNZ_ROW, B = 4096, 3, 8, 32
RESCALE = {"start": "a", "phases": {"a": {"ranks_per_node": 2}, "b": {"ranks_per_node": 3}},
           "rules": [{"in": "a", "when": "step >= 20", "then": {"goto": "b"}}]}


def write_csr(path: Path, n: int, seed: int) -> None:
    """Write n random CSR rows over D features whose labels follow a random linear model (some rows empty)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 2 * NNZ_ROW, n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    indices = np.concatenate([np.sort(rng.choice(D, m, replace=False)) for m in lens]).astype(np.int32)
    data = rng.standard_normal(indices.size).astype(np.float32)
    W = np.random.default_rng(99).standard_normal((D, K))
    Z = np.zeros((n, K))
    rows = np.repeat(np.arange(n), lens)
    np.add.at(Z, rows, data[:, None] * W[indices])
    y = (Z + 0.3 * rng.standard_normal((n, K))).argmax(1).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["indptr"], f["indices"], f["data"], f["y"] = indptr, indices, data, y
        f.attrs["format"], f.attrs["n_features"], f.attrs["classes"] = "csr", D, K


@pytest.fixture(scope="module")
def csr_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("csr")
    write_csr(folder / "train.h5", 3000, 1)
    write_csr(folder / "valid.h5", 500, 2)
    return folder


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return np.asarray(arrays["params"])


COMMON = dict(model={"kind": "softmax", "l2": 1e-4}, optimizer={"kind": "sgd", "lr": 0.5, "momentum": 0.9, "batch": B},
              goal={"max_steps": 40})


def test_sparse_sync_matches_dense_at_a_fraction_of_the_bytes(tmp_path: Path, csr_data: Path) -> None:
    jobs = {}
    two = {"start": "two", "phases": {"two": {"ranks_per_node": 2}}}
    for kind in ("dense", "sparse"):
        spec = write_spec(tmp_path / f"{kind}.yaml", csr_data, fleet=two, sync={"kind": kind}, **COMMON)
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / kind))
        assert proc.returncode == 0, proc.stderr
        jobs[kind] = tmp_path / kind
    # 2 ranks: a + b is the same float sum either way; only the kernels' order may differ.
    np.testing.assert_allclose(_params(jobs["sparse"]), _params(jobs["dense"]), rtol=1e-9, atol=1e-12)
    steps = {k: [m for m in metrics(j) if not m.get("eval")] for k, j in jobs.items()}
    dense_bytes = ((D + 1) * K + 4) * 8
    assert all(m["sync_bytes_per_step"] == dense_bytes for m in steps["dense"])
    assert max(m["sync_bytes_per_step"] for m in steps["sparse"]) * 10 < dense_bytes
    # Exact count for rank 0 at step 0: record, its ids, then the union's rows and the biases.
    reader = CsrReader(csr_data / "train.h5")
    order = SampleOrder(reader.n, B, 1, 32)
    cols = [np.unique(reader.read(order.ranges(*order.share(0, r, 2)))[0].indices) for r in range(2)]
    union = np.union1d(*cols)
    expect = (1 + 4) * 8 + 4 * cols[0].size + 8 * (union.size + 1) * K
    first = next(m for m in steps["sparse"] if m["step"] in (0, 1))
    assert first["sync_bytes_per_step"] == expect


def test_exact_sync_on_csr_rescaled_2_to_3_is_bitwise_one_rank(tmp_path: Path, csr_data: Path) -> None:
    rescaled, solo = run_rescaled_and_solo(tmp_path, csr_data, RESCALE, sync={"kind": "exact"}, **COMMON)
    assert [(e["from_ranks"], e["to_ranks"]) for e in events(rescaled) if e["event"] == "rescale"] == [(2, 3)]
    assert np.array_equal(_params(rescaled), _params(solo))


def test_sparse_sync_rescaled_2_to_3_follows_one_rank(tmp_path: Path, csr_data: Path) -> None:
    rescaled, solo = run_rescaled_and_solo(tmp_path, csr_data, RESCALE, sync={"kind": "sparse"}, **COMMON)
    assert [(e["from_ranks"], e["to_ranks"]) for e in events(rescaled) if e["event"] == "rescale"] == [(2, 3)]
    fp = {j: [m["batch_fp"] for m in metrics(j) if not m.get("eval")] for j in (rescaled, solo)}
    assert fp[rescaled] == fp[solo]
    np.testing.assert_allclose(_params(rescaled), _params(solo), rtol=1e-8, atol=1e-10)


def test_lbfgs_on_a_fixed_csr_batch_trains(tmp_path: Path, csr_data: Path) -> None:
    # L-BFGS keeps a copy of its fixed batch (CsrBatch.copy: it used to stop with
    # AttributeError on every rank). Two ranks, each half the batch. (That the copy survives
    # the reader's next read: test_csr_data's view test.)
    two = {"start": "two", "phases": {"two": {"ranks_per_node": 2}}}
    spec = write_spec(tmp_path / "s.yaml", csr_data, fleet=two, model=COMMON["model"],
                      optimizer={"kind": "lbfgs", "lbfgs": {"batch": 512}}, goal={"max_steps": 6})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "j"))
    assert proc.returncode == 0, proc.stderr
    losses = [m["loss"] for m in metrics(tmp_path / "j") if not m.get("eval")]
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0], losses
    assert np.isfinite(_params(tmp_path / "j")).all()


def test_sparse_sync_refuses_mlp(tmp_path: Path, csr_data: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", csr_data, sync={"kind": "sparse"},
                      **{**COMMON, "model": {"kind": "mlp", "hidden": [8]}})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "j"))
    assert proc.returncode == 2 and "sync.kind" in proc.stderr and "Traceback" not in proc.stderr


SYNC_SCRIPT = '''
import sys
import numpy as np
from mpi4py import MPI
from fleetmpi.models import SoftmaxRegression
from fleetmpi.sync import DenseSync, SparseSync
from kernels.sparse import CsrBatch

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()
d, k = 4096, 3
model = SoftmaxRegression(d, k, 0.0)
w = np.random.default_rng(7).standard_normal((d + 1) * k)
for density, want in ((0.0005, "ids"), (0.05, "bitmap")):
    rng = np.random.default_rng([rank, int(density * 10000)])
    X = np.where(rng.random((20, d)) < density, rng.standard_normal((20, d)), 0.0).astype(np.float32)
    y = rng.integers(0, k, 20).astype(np.float32)
    dense, sp = DenseSync(comm, w.size, 4), SparseSync(comm, w.size, 4)
    ex = np.array([1.0 + rank, 2.0, 3.0, 0.0])
    dense.local_grad(model, X, y, w, dense.grad_out)
    gd, exd = dense.reduce(dense.grad_out, ex)
    sp.local_grad(model, CsrBatch.from_dense(X), y, w, sp.grad_out)
    gs, exs = sp.reduce(sp.grad_out, ex)
    assert sp.exchange == (want if P > 1 else "ids"), (sp.exchange, want)
    assert np.allclose(gs, gd, rtol=1e-12, atol=1e-12), np.abs(gs - gd).max()
    assert np.array_equal(exs, exd)
    touched = np.flatnonzero(np.any(X != 0, axis=0))
    union = np.flatnonzero(np.any(np.array(comm.allgather(np.any(X != 0, axis=0))), axis=0))
    idx = touched.size * 4 if sp.exchange == "ids" else (d + 7) // 8
    assert sp.payload_bytes == 5 * 8 + idx + 8 * (union.size + 1) * k, (sp.payload_bytes, sp.exchange)
print("ok", rank)
'''


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sparse_sync_equals_dense_by_ids_and_by_bitmap(tmp_path: Path, ranks: int) -> None:
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    proc = mpirun(ranks, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == ranks
