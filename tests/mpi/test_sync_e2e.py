"""Threshold and exact sync end to end: the real CLI under real mpiexec, through rescales."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, run_rescaled_and_solo, write_spec

from fleetmpi.engine import checkpoint
from fleetmpi.engine.data import SampleOrder
from fleetmpi.h5store import read_h5_verified
from kernels import reference as ref

pytestmark = pytest.mark.slow

B, LR, TAU, CLASSES = 50, 0.2, 4.0, 4
DENSE_BYTES = ((12 + 1) * CLASSES + 4) * 8   # float64 gradient + 4 extras of softmax on d=12


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return arrays["params"]


def test_threshold_rescale_2_to_3_on_falling_bytes_keeps_all_gradient_mass(tmp_path: Path, datasets: dict) -> None:
    data = datasets["multiclass"]
    # The rule fires below about 8 sent entries a step: a 1-byte header and 32 bytes of extras
    # a rank, + 1 byte an entry (gap varints: 52 parameters, every gap under 64).
    # Plain SGD (no momentum, no L2, constant lr): each step moves the parameters by exactly
    # lr/B times the decoded global update, so the updates can be read back from checkpoints.
    spec = write_spec(tmp_path / "s.yaml", data, model={"kind": "softmax", "l2": 0.0},
                      optimizer={"kind": "sgd", "lr": LR, "momentum": 0.0, "batch": B},
                      sync={"kind": "threshold", "tau": TAU}, goal={"max_steps": 90},
                      checkpoint={"every_steps": 1, "keep": 1000},
                      fleet={"start": "a", "phases": {"a": {"ranks_per_node": 2}, "b": {"ranks_per_node": 3}},
                             "rules": [{"in": "a", "when": "sync_bytes_per_step < 41", "then": {"goto": "b"}}]})
    job = tmp_path / "job"
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr

    ev = events(job)
    fired = [e for e in ev if e["event"] == "rule_fired"]
    assert len(fired) == 1 and fired[0]["metrics"]["sync_bytes_per_step"] < 41
    rescale = [e for e in ev if e["event"] == "rescale"]
    assert [(e["from_ranks"], e["to_ranks"]) for e in rescale] == [(2, 3)]
    S = rescale[0]["step"]
    assert 10 < S < 85

    # Bytes per step: counted per step, far below dense, and falling as the model learns.
    steps = [m for m in metrics(job) if not m.get("eval")]
    sent = [m["sync_bytes_per_step"] for m in steps if m["step"] <= S]
    assert max(m["sync_bytes_per_step"] for m in steps) < DENSE_BYTES / 2
    assert all(m["wire_bytes_per_step"] > 0 for m in steps)
    assert np.mean(sent[:10]) > 1.2 * np.mean(sent[-10:])
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]

    # Mass: sum of the global gradients G_t of steps 1..t-1 == sum of applied updates +
    # residual(t) - residual(1), with G_t recomputed from the checkpointed parameters.
    ck = {c.step: c for c in (checkpoint.load(p) for p in checkpoint.list_checkpoints(job / "ckpt"))}
    assert set(range(1, 90)) <= set(ck)   # step 90 ends in model.h5, not a checkpoint
    res_S = ck[S].arrays["sync_residual"]
    assert np.abs(res_S).max() > 0.5 and np.isfinite(res_S).all()
    with h5py.File(data / "train.h5") as f:
        X, y = f["X"][...], f["y"][...]
    order = SampleOrder(len(y), B, 1, 32)
    G = np.zeros_like(res_S)
    for t in range(1, 89):
        rows = np.concatenate([np.arange(lo, hi) for lo, hi in order.ranges(*order.share(t, 0, 1))])
        G += ref.softmax_loss_grad(X[rows], y[rows], ck[t].arrays["params"], CLASSES)[1]
        if t + 1 in (S, 89):
            T = t + 1
            applied = (ck[1].arrays["params"] - ck[T].arrays["params"]) * (B / LR)
            kept = ck[T].arrays["sync_residual"] - ck[1].arrays["sync_residual"]
            np.testing.assert_allclose(applied + kept, G, rtol=0, atol=1e-8 * np.abs(G).max())
    # Dropping the residual at the rescale would miss by res_S, far above that tolerance.
    assert np.abs(res_S).max() > 1e3 * 1e-8 * np.abs(G).max()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_threshold_extras_every_trains_the_same_model_and_reports_window_losses(
        tmp_path: Path, datasets: dict, ranks: int) -> None:
    """extras_every: 5 changes what goes on the wire, never the model; the loss comes per window.

    Against the same run with extras every step: bitwise-equal parameters, fewer bytes; the
    loss of steps 1, 5, 10, ... is the mean of that run's per-step losses over the window
    (step 1; steps 2-5; 6-10; ...), and the steps between repeat the last reported loss.
    """
    data = datasets["multiclass"]
    jobs = {}
    for every in (1, 5):
        spec = write_spec(tmp_path / f"e{every}.yaml", data, model={"kind": "softmax", "l2": 1e-4},
                          optimizer={"kind": "sgd", "lr": 0.2, "momentum": 0.9, "batch": B},
                          sync={"kind": "threshold", "tau": 16.0, **({"extras_every": every} if every > 1 else {})},
                          goal={"max_steps": 40}, fleet={"start": "a", "phases": {"a": {"ranks_per_node": ranks}}})
        jobs[every] = tmp_path / f"job{every}"
        proc = cli("run", str(spec), "--job-dir", str(jobs[every]))
        assert proc.returncode == 0, proc.stderr
    assert np.array_equal(_params(jobs[1]), _params(jobs[5]))
    per_step = {m["step"]: m for m in metrics(jobs[1]) if not m.get("eval")}
    windowed = {m["step"]: m for m in metrics(jobs[5]) if not m.get("eval")}
    assert sorted(per_step) == sorted(windowed) == list(range(1, 41))
    last = None
    for t in range(1, 41):
        if t == 1 or t % 5 == 0:
            lo = 1 if t == 1 else t - 4 if t > 5 else 2
            want = np.mean([per_step[u]["loss"] for u in range(lo, t + 1)])
            assert windowed[t]["loss"] == pytest.approx(want, rel=1e-12), t
            last = windowed[t]["loss"]
        else:
            assert windowed[t]["loss"] == last, t
    # The same entries; a rank's 32 bytes of extras go out on 9 of the 40 steps, not all 40.
    total1, total5 = per_step[40]["sync_bytes_total"], windowed[40]["sync_bytes_total"]
    assert total1 - total5 == 32 * 31, (total1, total5)


@pytest.mark.parametrize("kind", ["softmax", "mlp"])
def test_exact_rescale_1_3_2_is_bitwise_equal_to_one_rank(tmp_path: Path, datasets: dict, kind: str) -> None:
    data = datasets["multiclass"]
    model = {"kind": kind, "l2": 1e-4, **({"hidden": [16]} if kind == "mlp" else {})}
    common = dict(model=model, sync={"kind": "exact"}, goal={"max_steps": 45},
                  optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9, "batch": B,
                             "schedule": {"kind": "cosine", "total_steps": 45}})
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": 1}, "b": {"ranks_per_node": 3},
                                      "c": {"ranks_per_node": 2}},
             "rules": [{"in": "a", "when": "step >= 15", "then": {"goto": "b"}},
                       {"in": "b", "when": "step >= 30", "then": {"goto": "c"}}]}
    rescaled, single = run_rescaled_and_solo(tmp_path, data, fleet, **common)

    starts = [(e["phase"], e["ranks"], e["step"]) for e in events(rescaled) if e["event"] == "phase_start"]
    assert starts == [("a", 1, 0), ("b", 3, 15), ("c", 2, 30)]
    p_r, p_s = _params(rescaled), _params(single)
    assert np.array_equal(p_r, p_s), f"max |diff| {np.abs(p_r - p_s).max():.3g}"
    assert np.abs(p_s).max() > 0.1
    # The int64 payload plus one record (rows, a bound per tensor, 4 extras) at any rank count.
    tensors = 1 if kind == "softmax" else 2
    payload = {m["sync_bytes_per_step"] for m in metrics(rescaled) if not m.get("eval")}
    assert payload == {8 * p_s.size + 8 * (1 + tensors + 4)}
