"""threads_per_rank end to end: one rank with two kernel threads against two ranks with one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, events, write_spec

from fleetmpi.h5store import read_h5_verified
from fleetmpi.launch.local import worker_env

# Batches of 2400 rows: above the 1024 rows from which the kernels use their threads.
BATCH = 2400


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a make-data folder large enough for threaded batches (6000 rows, 4 classes)."""
    folder = tmp_path_factory.mktemp("big")
    cli("make-data", "--task", "multiclass", "--classes", "4", "--n", "6000", "--d", "12", "--seed", "5",
        "--out", str(folder), check=True)
    return folder


def _run(tmp_path: Path, data: Path, name: str, ranks: int, threads: int, sync: str) -> np.ndarray:
    """Run 8 steps on ``ranks`` ranks with ``threads`` kernel threads each; return the final params."""
    fleet = {"start": "p", "phases": {"p": {"ranks_per_node": ranks, "threads_per_rank": threads}}}
    spec = write_spec(tmp_path / f"{name}.yaml", data, fleet=fleet, sync={"kind": sync},
                      goal={"max_steps": 8}, optimizer={"kind": "sgd", "lr": 0.05, "momentum": 0.9, "batch": BATCH})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    starts = [(e["ranks"], e["step"]) for e in events(tmp_path / name) if e["event"] == "phase_start"]
    assert starts == [(ranks, 0)]
    arrays, _ = read_h5_verified(tmp_path / name / "model.h5", kind="model")
    return np.concatenate([np.ravel(a) for _, a in sorted(arrays.items()) if a.dtype == np.float64])


def test_worker_env_sets_numba_threads_from_the_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    assert worker_env(threads=2)["NUMBA_NUM_THREADS"] == "2"
    assert worker_env()["NUMBA_NUM_THREADS"] == "1"


def test_one_rank_two_threads_equals_one_thread_bitwise(tmp_path: Path, big: Path) -> None:
    one = _run(tmp_path, big, "t1", 1, 1, "dense")
    two = _run(tmp_path, big, "t2", 1, 2, "dense")
    assert np.abs(one).max() > 0.05
    assert one.tobytes() == two.tobytes()


def test_one_rank_two_threads_equals_two_ranks_exact_bitwise(tmp_path: Path, big: Path) -> None:
    a = _run(tmp_path, big, "r1t2", 1, 2, "exact")
    b = _run(tmp_path, big, "r2t1", 2, 1, "exact")
    assert np.abs(a).max() > 0.05
    assert a.tobytes() == b.tobytes()


def test_one_rank_two_threads_matches_two_ranks_dense(tmp_path: Path, big: Path) -> None:
    a = _run(tmp_path, big, "d1t2", 1, 2, "dense")
    b = _run(tmp_path, big, "d2t1", 2, 1, "dense")
    # Dense sync adds the ranks' float sums in another order: equal to rounding, not bitwise.
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(a).max())
