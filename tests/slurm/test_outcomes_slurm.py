"""`submit --wait --json` on the minicluster says whether the target was met; exit 5 ends the chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _spec(tmp_path: Path, data: Path, name: str, goal: dict[str, Any]) -> Path:
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"}}}
    return write_spec(tmp_path / f"{name}.yaml", data, name=name, fleet=fleet, goal=goal,
                      checkpoint={"every_steps": 1000, "keep": 2},
                      monitor={"log_every_steps": 1, "eval_every_steps": 5},
                      scheduler={"backend": "slurm", "submit_backoff_s": 0.2})


def test_submit_json_carries_target_met_and_a_missed_target_exits_5(tmp_path: Path, datasets: dict) -> None:
    met = _spec(tmp_path, datasets["multiclass"], "met", {"max_steps": 60, "valid_accuracy_above": 0.3})
    proc = cli("submit", str(met), "--wait", "--json", "--job-dir", str(tmp_path / "met"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 0 and out["target_met"] is True and out["outcome"] == "target met"
    assert out["metrics"]["valid_accuracy"] > 0.3 and out["reason"].startswith("target met: valid_accuracy ")

    missed = _spec(tmp_path, datasets["multiclass"], "missed",
                   {"max_steps": 15, "valid_accuracy_above": 0.999, "require_target": True})
    proc = cli("submit", str(missed), "--wait", "--json", "--job-dir", str(tmp_path / "missed"), timeout=300)
    assert proc.returncode == 5, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 5 and out["target_met"] is False and out["outcome"] == "budget spent"
    assert out["metrics"]["step"] == 15 and out["model"]
    # Final: one Slurm job, no resubmission after exit 5.
    assert len(out["chain"]) == 1 and out["chain"][0]["exit_code"] == 5


def test_submit_wait_on_a_nan_run_says_why_on_the_final_line_and_in_json(tmp_path: Path, datasets: dict) -> None:
    nan = write_spec(tmp_path / "nan.yaml", datasets["regression"], name="nan", model={"kind": "linear"},
                     optimizer={"kind": "sgd", "lr": 50.0, "batch": 40}, goal={"max_steps": 500},
                     fleet={"start": "small", "phases": {"small": {"nodes": 1, "ranks_per_node": 2,
                                                                   "partition": "cpu"}}},
                     scheduler={"backend": "slurm", "submit_backoff_s": 0.2})
    proc = cli("submit", str(nan), "--wait", "--json", "--job-dir", str(tmp_path / "nan"), timeout=300)
    assert proc.returncode == 1, proc.stderr
    final = proc.stderr.strip().splitlines()[-1]
    assert "chain ended: FAILED (phase small: training failed: training loss is" in final and "slurm-" in final, final
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 1 and "training loss is" in out["reason"]
