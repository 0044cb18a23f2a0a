"""End-to-end training under real mpiexec: rescales, equivalence across fleet sizes, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from conftest import ROOT, cli, events, metrics, model_params, run_rescaled_and_solo, wait_for_event, write_spec

from fleetmpi.engine.data import SampleOrder
from fleetmpi.engine.h5rows import row_fingerprint
from fleetmpi.h5store import read_h5_verified
from kernels import reference

pytestmark = pytest.mark.slow


def _by_step(job: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(job) if not m.get("eval")}


def test_quickstart_rescales_twice_reaches_goal_and_predicts(tmp_path: Path) -> None:
    job = tmp_path / "job"
    proc = cli("run", str(ROOT / "examples" / "quickstart.yaml"), "--job-dir", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "COMPLETED"
    ev = events(job)
    fired = [e for e in ev if e["event"] == "rule_fired"]
    assert any("sync_bytes_total" in e["metrics"] for e in fired), fired
    assert any("epoch" in e["metrics"] for e in fired), fired
    rescales = [(e["from"], e["to"]) for e in ev if e["event"] == "rescale"]
    assert rescales == [("small", "wide"), ("wide", "single")]
    starts = [(e["phase"], e["ranks"]) for e in ev if e["event"] == "phase_start"]
    assert starts == [("small", 2), ("wide", 3), ("single", 1)]
    goal = [e for e in ev if e["event"] == "goal"]
    assert len(goal) == 1 and goal[0]["targets_hit"] == ["valid_loss_below"] and goal[0]["valid_loss"] < 0.15

    # predict agrees with the final model evaluated by the numpy reference
    pred = tmp_path / "pred.h5"
    valid = ROOT / "examples" / "data" / "valid.h5"
    assert cli("predict", str(job / "model.h5"), str(valid), "--out", str(pred)).returncode == 0
    arrays, _ = read_h5_verified(pred, kind="predictions")
    with h5py.File(valid) as f:
        X, y = f["X"][...], f["y"][...]
    want = reference.softmax_predict_proba(X, model_params(job), 10)
    np.testing.assert_allclose(arrays["proba"], want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(arrays["pred"], want.argmax(axis=1))
    assert (arrays["pred"] == y).mean() > 0.9


@pytest.mark.parametrize("kind", ["softmax", "mlp"])
def test_rescale_2_3_1_matches_uninterrupted_single_rank(tmp_path: Path, datasets: dict, kind: str) -> None:
    data = datasets["multiclass"]
    model = {"kind": kind, "l2": 1e-4, **({"hidden": [16]} if kind == "mlp" else {})}
    # Batch 47 divides neither the 800 training rows (batches span epoch boundaries, so a
    # batch may hold a row twice) nor 2 or 3 ranks (unequal shares).
    common = dict(model=model, optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9, "batch": 47,
                                          "schedule": {"kind": "cosine", "total_steps": 70}},
                  goal={"max_steps": 70})
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": 2}, "b": {"ranks_per_node": 3},
                                      "c": {"ranks_per_node": 1}},
             "rules": [{"in": "a", "when": "step >= 20", "then": {"goto": "b"}},
                       {"in": "b", "when": "step >= 45", "then": {"goto": "c"}}]}
    rescaled, single = run_rescaled_and_solo(tmp_path, data, fleet, **common)

    starts = [(e["phase"], e["ranks"], e["step"]) for e in events(rescaled) if e["event"] == "phase_start"]
    assert starts == [("a", 2, 0), ("b", 3, 20), ("c", 1, 45)]
    p_r, p_s = model_params(rescaled), model_params(single)
    rel = np.linalg.norm(p_r - p_s) / np.linalg.norm(p_s)
    assert rel < 1e-5, rel
    assert not np.array_equal(p_s, np.zeros_like(p_s))

    # Same samples at every step: recorded cursor and row fingerprint, checked against an
    # independent recomputation of the epoch permutation.
    mr, ms = _by_step(rescaled), _by_step(single)
    assert sorted(mr) == sorted(ms) == list(range(1, 71))
    with h5py.File(data / "train.h5") as f:
        n = f["X"].shape[0]
    block = min(32, n)
    nblocks = -(-n // block)
    for step in range(1, 71):
        assert mr[step]["cursor"] == ms[step]["cursor"] == (step - 1) * 47
        assert mr[step]["batch_fp"] == ms[step]["batch_fp"]
        pos = np.arange((step - 1) * 47, step * 47)
        rows = []
        for p in pos:
            e, off = divmod(int(p), n)
            perm = np.random.default_rng([1, e]).permutation(nblocks)
            seq = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in perm])
            rows.append(seq[off])
        expect = sum(row_fingerprint(r, r + 1) for r in rows)
        assert mr[step]["batch_fp"] == expect, step


def _worker_pids(launcher: int) -> list[int]:
    kids = psutil.Process(launcher).children(recursive=True)
    # mpiexec's own argv names fleetmpi.engine.worker too; the ranks are the python processes.
    return [k.pid for k in kids if k.cmdline()[1:3] == ["-m", "fleetmpi.engine.worker"]]


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FLEETMPI_PROGRESS": "none", **(env or {})})


def test_kill9_of_one_rank_ends_run_then_resume_skips_truncated_checkpoint(tmp_path: Path, datasets: dict) -> None:
    # The kill comes at the second checkpoint (step 200): 12000 steps leave ~0.8 s on a quiet machine.
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 12000},
                      checkpoint={"every_steps": 100, "keep": 5},
                      monitor={"log_every_steps": 50, "eval_every_steps": 50},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    job = tmp_path / "job"
    proc = _start(["run", str(spec), "--job-dir", str(job)])
    wait_for_event(job, "checkpoint")
    while len([e for e in events(job) if e["event"] == "checkpoint"]) < 2:
        time.sleep(0.01)
    pids = _worker_pids(proc.pid)
    assert len(pids) == 2
    t_kill = time.time()
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    took = time.time() - t_kill
    assert proc.returncode == 1, err
    assert took < 15, took
    assert "SIGKILL" in err and "resumes from the newest checkpoint" in err
    assert "Traceback" not in err

    ckpts = sorted((job / "ckpt").glob("step-*.h5"))
    assert len(ckpts) >= 2
    newest, previous = ckpts[-1], ckpts[-2]
    data = newest.read_bytes()
    cut = int(np.random.default_rng(7).integers(1, len(data) - 1))
    newest.write_bytes(data[:cut])

    again = cli("run", str(job))
    assert again.returncode == 0, again.stderr
    ev = events(job)
    skipped = [e for e in ev if e["event"] == "checkpoint_skipped"]
    assert [e["path"] for e in skipped] == [str(newest)]
    resume = [e for e in ev if e["event"] == "resume"][-1]
    assert resume["checkpoint"] == str(previous)
    assert resume["step"] == int(previous.stem.split("-")[1])
    assert Path(str(newest) + ".corrupt").exists()
    assert [e for e in ev if e["event"] == "goal"][-1]["step"] == 12000


def test_sigterm_checkpoints_exits_4_and_resumes_at_that_step(tmp_path: Path, datasets: dict) -> None:
    # 20000 steps: ~1.3 s at ~64 us/step on a quiet machine, so the signal (sent at the first step)
    # lands mid-training; the resume trains the rest.
    spec = write_spec(tmp_path / "s.yaml", datasets["binary"], model={"kind": "logistic"},
                      goal={"max_steps": 20000}, checkpoint={"every_steps": 5000, "keep": 2},
                      monitor={"log_every_steps": 10, "eval_every_steps": 25},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    job = tmp_path / "job"
    proc = _start(["run", str(spec), "--job-dir", str(job)])
    wait_for_event(job, "first_step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    sig = wait_for_event(job, "signal")
    assert sig["signal"] == "SIGTERM"
    ck = [e for e in events(job) if e["event"] == "checkpoint"][-1]
    assert ck["step"] == sig["step"] and ck["reason"].startswith("signal")
    assert 0 < sig["step"] < 20000
    again = cli("run", str(job))
    assert again.returncode == 0, again.stderr
    resume = [e for e in events(job) if e["event"] == "resume"][-1]
    assert resume["step"] == sig["step"]


def test_one_rank_exception_ends_the_world_with_rank_and_host(tmp_path: Path, datasets: dict) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 100000},
                      fleet={"start": "three", "phases": {"three": {"ranks_per_node": 3}}})
    t0 = time.time()
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"), env={"FLEETMPI_TEST_FAULT": "2:7"}, timeout=60)
    assert proc.returncode == 1
    assert time.time() - t0 < 30
    assert "rank 2/3@" in proc.stderr and "injected fault at step 7" in proc.stderr
    errors = [e for e in events(tmp_path / "job") if e["event"] == "error"]
    assert errors and "rank 2/3@" in errors[0]["message"]


def test_chunked_data_trains_like_contiguous_data_and_says_it_is_slower(tmp_path: Path, datasets: dict) -> None:
    # Contiguous files are read through a memory map, chunked/compressed ones by HDF5
    # hyperslab: the same rows in the same order, so the same model bit for bit.
    src = datasets["binary"]
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    with h5py.File(src / "train.h5") as f, h5py.File(chunked / "train.h5", "w") as g:
        g.create_dataset("X", data=f["X"][...], chunks=(64, f["X"].shape[1]), compression="gzip")
        g.create_dataset("y", data=f["y"][...], chunks=(64,), compression="gzip")
    (chunked / "valid.h5").write_bytes((src / "valid.h5").read_bytes())
    params, logs = {}, {}
    for name, data in (("contiguous", src), ("chunked", chunked)):
        spec = write_spec(tmp_path / f"{name}.yaml", data, model={"kind": "logistic", "l2": 1e-4},
                          optimizer={"kind": "sgd", "lr": 0.3, "momentum": 0.9, "batch": 47}, goal={"max_steps": 40},
                          fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / f"job-{name}"))
        assert proc.returncode == 0, proc.stderr
        params[name] = read_h5_verified(tmp_path / f"job-{name}" / "model.h5", kind="model")[0]["params"]
        logs[name] = proc.stdout + proc.stderr
    assert np.array_equal(params["contiguous"], params["chunked"])
    assert np.abs(params["chunked"]).max() > 0.1
    assert "is chunked or compressed: rows are read by HDF5 hyperslab" in logs["chunked"]
    assert "hyperslab" not in logs["contiguous"]


def test_divergence_to_nan_fails_with_reason(tmp_path: Path, datasets: dict) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["regression"], model={"kind": "linear"},
                      optimizer={"kind": "sgd", "lr": 50.0, "batch": 40}, goal={"max_steps": 500},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 1
    assert "training failed: training loss is" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "job" / "state.json").read_text())["status"] == "FAILED"


def test_manual_approval_holds_rescale_until_approved(tmp_path: Path, datasets: dict) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 200000},
                      monitor={"log_every_steps": 10, "eval_every_steps": 10},
                      fleet={"start": "a", "approval": "manual",
                             "phases": {"a": {"ranks_per_node": 1}, "b": {"ranks_per_node": 2}},
                             "rules": [{"in": "a", "when": "step >= 30", "then": {"goto": "b"}},
                                       {"in": "b", "when": "phase_steps >= 20", "then": {"stop": True}}]})
    job = tmp_path / "job"
    proc = _start(["run", str(spec), "--job-dir", str(job)])
    pending = wait_for_event(job, "approval_pending")
    assert pending["goto"] == "b"
    time.sleep(1.0)
    steps_waiting = max(m["step"] for m in metrics(job))
    assert steps_waiting > pending["step"] + 10  # training went on while waiting
    assert not [e for e in events(job) if e["event"] == "rescale"]
    ok = cli("approve", str(job))
    assert ok.returncode == 0, ok.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # The terminal says what to type, once (issue 16.4).
    assert err.count(f"training goes on in phase a until approved: fleetmpi approve {job}") == 1, err
    ev = events(job)
    kinds = [e["event"] for e in ev]
    assert kinds.index("approved") < kinds.index("approval_used") < kinds.index("rescale")
    assert [(e["phase"], e["ranks"]) for e in ev if e["event"] == "phase_start"] == [("a", 1), ("b", 2)]
    assert [e for e in ev if e["event"] == "goal"][0]["reason"].startswith("stop rule")


@pytest.mark.parametrize("ranks", [1, 2])
def test_rule_switches_sgd_to_lbfgs_and_loss_drops(tmp_path: Path, datasets: dict, ranks: int) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["binary"], model={"kind": "logistic", "l2": 1e-3},
                      optimizer={"kind": "sgd", "lr": 0.05, "batch": 100, "lbfgs": {"history": 5}},
                      goal={"max_steps": 60},
                      fleet={"start": "p", "phases": {"p": {"ranks_per_node": ranks}},
                             "rules": [{"when": "step >= 20", "then": {"optimizer": "lbfgs"}}]})
    job = tmp_path / "job"
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    switch = [e for e in events(job) if e["event"] == "optimizer_switch"]
    assert len(switch) == 1 and switch[0]["to"] == "lbfgs" and switch[0]["step"] == 20
    rows = _by_step(job)
    # The budget, or sooner where L-BFGS converges (its gradient within tol_grad: solved).
    goal = next(e for e in events(job) if e["event"] == "goal")
    last = goal["step"]
    assert last == max(rows) and (last == 60 or (goal["outcome"] == "solved" and last > 30)), goal
    assert all(rows[s]["optimizer"] == "sgd" for s in range(1, 21))
    assert all(rows[s]["optimizer"] == "lbfgs" for s in range(21, last + 1))
    lb = [rows[s]["loss"] for s in range(22, last + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(lb, lb[1:]))  # full-batch L-BFGS never goes up
    assert lb[-1] < rows[20]["loss"]
    # The full-data objective at the final point matches the numpy reference.
    with h5py.File(datasets["binary"] / "train.h5") as f:
        X, y = f["X"][...], f["y"][...]
    w = model_params(job)
    ref, _ = reference.logistic_loss_grad(X, y, w)
    assert abs(rows[last]["loss"] - (ref / len(y) + 0.5e-3 * float(w[:-1] @ w[:-1]))) < 1e-9


def test_sample_order_independent_of_rank_count() -> None:
    n, B = 1003, 64
    order = SampleOrder(n, B, seed=5, block_rows=16)
    for epoch in range(2):
        covered = []
        for lo, hi in order.ranges(epoch * n, (epoch + 1) * n):
            covered.extend(range(lo, hi))
        assert sorted(covered) == list(range(n))  # every row once per epoch
    for P in (1, 2, 3, 5, 64, 70):
        for step in (0, 1, 15, 16, 31):
            shares = [order.share(step, r, P) for r in range(P)]
            assert shares[0][0] == step * B and shares[-1][1] == (step + 1) * B
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            rows = [i for s in shares for lo, hi in order.ranges(*s) for i in range(lo, hi)]
            whole = [i for lo, hi in order.ranges(step * B, (step + 1) * B) for i in range(lo, hi)]
            assert rows == whole
