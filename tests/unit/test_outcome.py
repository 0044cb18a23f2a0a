"""The outcome line and fields, the exit code for a missed target, and who treats it as final."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fleetmpi.engine.monitor import finite_or_none, outcome
from fleetmpi.errors import BadInput, ExitCode
from fleetmpi.jobs.backends import AllocState
from fleetmpi.jobs.manager import Outcome, classify
from fleetmpi.launch.slurm.batch import Action, classify_exit
from fleetmpi.spec import GoalSpec, from_raw


def test_target_met_line_and_fields() -> None:
    goal = GoalSpec(valid_loss_below=0.40, max_epochs=60)
    out = outcome(goal, ended_by="target", hit=["valid_loss_below"], step=70, budget="max_epochs 60",
                  metrics={"step": 70, "loss": 0.31, "valid_loss": 0.39, "ranks": 2}, best_step=70,
                  best={"valid_loss": 0.39}, model_step=70)
    assert out["reason"] == "target met: valid_loss 0.39 < 0.4 at step 70"
    assert (out["target_met"], out["outcome"], out["model_step"]) == (True, "target met", 70)
    assert out["metrics"] == {"step": 70, "loss": 0.31, "valid_loss": 0.39}


def test_budget_spent_line_names_the_best_and_nan_becomes_null() -> None:
    goal = GoalSpec(valid_loss_below=0.40, max_epochs=60)
    out = outcome(goal, ended_by="budget", hit=[], step=900, budget="max_epochs 60",
                  metrics={"step": 900, "loss": math.nan, "valid_loss": 0.73}, best_step=10,
                  best={"valid_loss": 0.5}, model_step=10)
    assert out["reason"] == ("budget spent (max_epochs 60) before valid_loss < 0.4; best valid_loss 0.5 at "
                             "step 10, written to model.h5")
    assert out["target_met"] is False and out["outcome"] == "budget spent"
    assert out["metrics"]["loss"] is None
    json.dumps(out, allow_nan=False)


def test_no_target_is_null_and_patience_says_stopped_early() -> None:
    out = outcome(GoalSpec(max_steps=50), ended_by="budget", hit=[], step=50, budget="max_steps 50",
                  metrics={"step": 50}, best_step=None, best={}, model_step=50)
    assert out["target_met"] is None
    assert out["reason"] == "budget spent (max_steps 50); model from step 50 written to model.h5"
    goal = GoalSpec(max_steps=500, patience=3, min_delta=0.01, valid_accuracy_above=0.9)
    out = outcome(goal, ended_by="patience", hit=[], step=40, budget="max_steps 500",
                  metrics={"step": 40, "valid_accuracy": 0.64}, best_step=25, best={"valid_loss": 0.6},
                  model_step=25)
    assert out["outcome"] == "stopped early" and out["target_met"] is False
    assert out["reason"].startswith("stopped early (valid_loss not better by more than 0.01 in 3 evaluations) at "
                                    "step 40 before valid_accuracy > 0.9")


def test_finite_or_none_reaches_nested_values() -> None:
    assert finite_or_none({"a": [1.0, math.inf], "b": {"c": -math.inf}, "d": "x"}) == {
        "a": [1.0, None], "b": {"c": None}, "d": "x"}


def test_missed_target_is_final_for_the_manager_and_the_chain() -> None:
    assert ExitCode.of(5) is ExitCode.TARGET_MISSED and "target" in ExitCode.TARGET_MISSED.meaning
    outcome_, why = classify(AllocState("FAILED", 5, ""), has_checkpoint=True)
    assert outcome_ is Outcome.FAIL and "target not met" in why
    assert classify(AllocState("COMPLETED", 0, ""), True)[0] is Outcome.DONE
    assert classify_exit(5, "", goal_reached=True, lost=None).action is Action.MISSED
    # Slurm losing the node after the run ended does not undo the end.
    assert classify_exit(5, "", goal_reached=True, lost="NODE_FAIL").action is Action.MISSED
    assert classify_exit(0, "", goal_reached=True, lost=None).action is Action.COMPLETE


def _raw(tmp_path: Path, **goal: object) -> dict:
    (tmp_path / "t.h5").write_bytes(b"")
    return {"name": "t", "data": {"train": "t.h5"}, "model": {"kind": "softmax"},
            "goal": {"max_steps": 10, **goal}, "fleet": {"start": "a", "phases": {"a": {}}}}


@pytest.mark.parametrize(("goal", "says"), [
    ({"patience": 3}, "goal.patience: early stopping judges valid_loss: set data.valid"),
    ({"require_target": True}, "require_target needs a target"),
])
def test_spec_refuses_settings_that_cannot_work(tmp_path: Path, goal: dict, says: str) -> None:
    with pytest.raises(BadInput, match=says):
        from_raw(_raw(tmp_path, **goal), "t.yaml", tmp_path)


def test_keep_best_defaults_to_on_with_a_valid_set(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    assert from_raw(raw, "t.yaml", tmp_path).keep_best is False
    raw["data"]["valid"] = "t.h5"
    assert from_raw(raw, "t.yaml", tmp_path).keep_best is True
    raw["checkpoint"] = {"keep_best": False}
    assert from_raw(raw, "t.yaml", tmp_path).keep_best is False
