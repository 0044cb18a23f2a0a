"""How a run ends, said plainly: early stopping, keep_best, target_met, exit 5, a raised budget.

Real mpiexec at 1, 2 and 3 ranks, real HDF5 files, the real ledger and manager.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import cli, events, metrics, write_spec

from fleetmpi.h5store import read_h5_verified

OVERFIT = {"model": {"kind": "softmax", "l2": 0.0},
           "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.0, "batch": 20},
           "checkpoint": {"every_steps": 50, "keep": 2},
           "monitor": {"log_every_steps": 5, "eval_every_steps": 5}}


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Few noisy rows, many features, no l2: valid_loss falls, then rises as the model learns the noise."""
    out = tmp_path_factory.mktemp("overfit") / "d"
    cli("make-data", "--task", "binary", "--n", "240", "--d", "40", "--noise", "3", "--seed", "1",
        "--valid-fraction", "0.5", "--out", str(out), check=True)
    return out


def spec_on(tmp: Path, data: Path, name: str, ranks: int = 1, **sections: Any) -> Path:
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": ranks}}}
    return write_spec(tmp / f"{name}.yaml", data, **{"name": name, **OVERFIT, "fleet": fleet, **sections})


def run_json(*args: str) -> tuple[int, dict[str, Any], str]:
    proc = cli("run", *args, "--json", env={"FLEETMPI_PROGRESS": "none"})
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def eval_points(job: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["valid_loss"]) for m in metrics(job) if m.get("eval")]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_patience_stops_early_and_keeps_the_best_parameters(tmp_path: Path, overfit: Path, ranks: int) -> None:
    spec = spec_on(tmp_path, overfit, f"pat{ranks}", ranks, goal={"max_steps": 400, "patience": 4,
                                                                  "valid_loss_below": 0.01})
    rc, out, err = run_json(str(spec), "--job-dir", str(tmp_path / "job"))
    job = tmp_path / "job"
    assert rc == 0, err
    evals = eval_points(job)
    best_step, best_loss = min(evals, key=lambda e: (e[1], e[0]))
    last_step = evals[-1][0]
    # The run overfits: the best came early, then patience (4 evaluations of 5 steps) ended it.
    assert best_step < last_step < 400
    assert last_step == best_step + 4 * 5
    assert out["target_met"] is False and out["outcome"] == "stopped early"
    assert out["best_step"] == best_step == out["model_step"]
    assert out["best_metrics"]["valid_loss"] == pytest.approx(best_loss, rel=1e-12)
    assert out["metrics"]["step"] == last_step and out["metrics"]["valid_loss"] > best_loss
    assert out["reason"].startswith(f"stopped early (valid_loss not better by more than 0 in 4 evaluations) "
                                    f"at step {last_step} before valid_loss < 0.01; best valid_loss")
    assert f"at step {best_step}, written to model.h5" in out["reason"]
    assert out["reason"] in err
    model, meta = read_h5_verified(job / "model.h5")
    best, best_meta = read_h5_verified(job / "best.h5")
    assert meta["step"] == best_step == best_meta["step"]
    assert all(np.array_equal(model[k], best[k]) for k in best)
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "COMPLETED" and state["outcome"]["target_met"] is False
    goal = [e for e in events(job) if e["event"] == "goal"][-1]
    assert goal["target_met"] is False and goal["best_step"] == best_step
    # Every rank count keeps the parameters of the same step (sums over ranks differ in the last bits).
    if ranks > 1:
        solo_spec = spec_on(tmp_path, overfit, "solo", 1, goal={"max_steps": 400, "patience": 4,
                                                                "valid_loss_below": 0.01})
        assert cli("run", str(solo_spec), "--job-dir", str(tmp_path / "solo")).returncode == 0
        solo, solo_meta = read_h5_verified(tmp_path / "solo" / "model.h5")
        assert solo_meta["step"] == best_step
        for k in solo:
            assert np.linalg.norm(model[k] - solo[k]) <= 1e-6 * np.linalg.norm(solo[k]), k


def test_target_met_and_missed_and_no_target(tmp_path: Path, overfit: Path) -> None:
    met = spec_on(tmp_path, overfit, "met", 2, goal={"max_steps": 100, "valid_accuracy_above": 0.5})
    rc, out, err = run_json(str(met), "--job-dir", str(tmp_path / "met"))
    assert rc == 0, err
    assert out["target_met"] is True and out["outcome"] == "target met"
    assert out["reason"].startswith("target met: valid_accuracy ") and " > 0.5 at step " in out["reason"]
    assert out["model_step"] == out["metrics"]["step"] < 100

    missed = spec_on(tmp_path, overfit, "missed", 3, goal={"max_steps": 30, "valid_accuracy_above": 0.99,
                                                           "require_target": True})
    rc, out, err = run_json(str(missed), "--job-dir", str(tmp_path / "missed"))
    assert rc == 5, err
    assert out["exit_code"] == 5 and out["target_met"] is False and out["outcome"] == "budget spent"
    assert out["reason"].startswith("budget spent (max_steps 30) before valid_accuracy > 0.99; best valid_loss ")
    assert (tmp_path / "missed" / "model.h5").is_file()
    # Asking again says the same: the job is over, its target missed.
    assert cli("run", str(tmp_path / "missed")).returncode == 5

    plain = spec_on(tmp_path, overfit, "plain", 1, goal={"max_steps": 20},
                    checkpoint={"every_steps": 50, "keep": 2, "keep_best": False})
    rc, out, err = run_json(str(plain), "--job-dir", str(tmp_path / "plain"))
    assert rc == 0, err
    assert out["target_met"] is None and out["outcome"] == "budget spent"
    assert out["model_step"] == 20 and not (tmp_path / "plain" / "best.h5").exists()


def test_a_raised_budget_continues_a_finished_job_like_one_long_run(tmp_path: Path, overfit: Path) -> None:
    kw: dict[str, Any] = {"checkpoint": {"every_steps": 50, "keep": 2, "keep_best": False}}
    short = spec_on(tmp_path, overfit, "long", 2, goal={"max_steps": 20}, **kw)
    assert cli("run", str(short), "--job-dir", str(tmp_path / "job")).returncode == 0
    rc, out, err = run_json(str(tmp_path / "job"), "--set", "goal.max_steps=45")
    assert rc == 0, err
    assert out["status"] == "COMPLETED" and out["metrics"]["step"] == 45
    evs = events(tmp_path / "job")
    raised = [e for e in evs if e["event"] == "budget_raised"]
    assert len(raised) == 1 and raised[0]["max_steps"] == {"old": 20, "new": 45}
    assert [e["step"] for e in evs if e["event"] == "resume"] == [20]
    assert yaml.safe_load((tmp_path / "job" / "spec.yaml").read_text())["goal"]["max_steps"] == 45
    straight = spec_on(tmp_path, overfit, "long", 2, goal={"max_steps": 45}, **kw)
    assert cli("run", str(straight), "--job-dir", str(tmp_path / "straight")).returncode == 0
    a, _ = read_h5_verified(tmp_path / "job" / "model.h5")
    b, _ = read_h5_verified(tmp_path / "straight" / "model.h5")
    assert all(np.array_equal(a[k], b[k]) for k in b)

    for bad, says in (("model.l2=0.5", "--set model.l2 cannot change a job that exists"),
                      ("goal.max_steps=10", "--set goal.max_steps=10 is below the job's 45"),
                      ("goal.max_epochs=50", "would limit a job that has no goal.max_epochs")):
        proc = cli("run", str(tmp_path / "job"), "--set", bad)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr

    # A job in use refuses, and changes nothing: no spec written, no event.
    from fleetmpi.jobdir import JobDir
    from fleetmpi.lock import JobLock
    before = [(p.name, p.read_bytes()) for p in sorted((tmp_path / "job").glob("*.*")) if p.is_file()]
    with JobLock(JobDir(tmp_path / "job"), "test holder"):
        proc = cli("run", str(tmp_path / "job"), "--set", "goal.max_steps=90")
        assert proc.returncode == 2 and "in use" in proc.stderr, proc.stderr
        after = [(p.name, p.read_bytes()) for p in sorted((tmp_path / "job").glob("*.*"))
                 if p.is_file() and p.name != "lock.holder"]
    assert after == before


def test_raising_only_patience_after_the_budget_takes_no_step_past_it(tmp_path: Path, overfit: Path) -> None:
    spec = spec_on(tmp_path, overfit, "pat", 1, goal={"max_steps": 20, "patience": 50},
                   checkpoint={"every_steps": 50, "keep": 2, "keep_best": False})
    assert cli("run", str(spec), "--job-dir", str(tmp_path / "job")).returncode == 0
    rc, out, err = run_json(str(tmp_path / "job"), "--set", "goal.patience=60")
    assert rc == 0, err
    assert out["status"] == "COMPLETED" and out["metrics"]["step"] == 20 and out["outcome"] == "budget spent"
    assert sorted(p.name for p in (tmp_path / "job" / "ckpt").glob("step-*.h5"))[-1] == "step-00000020.h5"
    assert read_h5_verified(tmp_path / "job" / "model.h5")[1]["step"] == 20


def test_ledger_and_result_carry_target_met_and_exit_5_is_not_retried(tmp_path: Path, overfit: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmpi.api import JobFailed
    from fleetmpi.api import queue as submit
    from fleetmpi.jobs.ledger import COMPLETED, FAILED
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEETMPI_PROGRESS", "none")
    retry = {"max_attempts": 3, "backoff_s": 0}
    met = submit(spec_on(tmp_path, overfit, "lmet", 1, goal={"max_steps": 60, "valid_accuracy_above": 0.5},
                         retry=retry))
    res = met.result(timeout=180)
    assert res.target_met is True and res.outcome["outcome"] == "target met"
    assert res.metrics["valid_accuracy"] > 0.5 and met.row().status == COMPLETED
    assert met.row().result["target_met"] is True

    missed = submit(spec_on(tmp_path, overfit, "lmiss", 1, retry=retry,
                            goal={"max_steps": 20, "valid_accuracy_above": 0.99, "require_target": True}))
    with pytest.raises(JobFailed, match=r"budget spent \(max_steps 20\) before valid_accuracy > 0.99"):
        missed.result(timeout=180)
    row = missed.row()
    assert row.status == FAILED and row.attempts == 1 and row.failures == 0
    assert row.result["target_met"] is False and row.result["outcome"] == "budget spent"
    assert [a.exit_code for a in missed.ledger.allocations(missed.id)] == [5]
