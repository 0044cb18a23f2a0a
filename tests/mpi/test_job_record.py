"""run --json, submit --json, status --json and Job.result() carry one record under the same names (issue 16, 7).

Real mpiexec (a rescale between 1, 2 and 3 ranks), real HDF5, the real ledger and manager.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, write_spec

from fleetmpi.jobs.summary import LOSS_MEANING, RECORD_KEYS

# Facts that are the same whoever reads them (``status`` and ``reason`` too, once the run ended).
SAME = ("job_dir", "status", "phase", "backend", "exit_code", "target_met", "outcome", "reason", "metrics",
        "best_step", "best_metrics", "model_step", "loss_meaning", "model", "chain")


def _spec(tmp_path: Path, data: Path, first: int, then: int, name: str = "rec") -> Path:
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": first}, "b": {"ranks_per_node": then}},
             "rules": [{"in": "a", "when": "step >= 10", "then": {"goto": "b"}}]}
    return write_spec(tmp_path / f"{name}.yaml", data, name=name, fleet=fleet,
                      goal={"max_steps": 25, "valid_accuracy_above": 0.999})


@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 3), (3, 1)])
def test_run_and_status_print_one_record_with_the_chain(tmp_path: Path, datasets: dict[str, Path], first: int,
                                                        then: int) -> None:
    spec = _spec(tmp_path, datasets["multiclass"], first, then)
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"), "--json")
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)
    status = json.loads(cli("status", str(tmp_path / "job"), "--json", check=True).stdout)
    assert list(ran) == list(RECORD_KEYS)
    assert list(status) == [*RECORD_KEYS, "live"]   # status adds what a running job is doing now
    for rec in (ran, status):
        assert rec["exit_code"] == 0 and rec["status"] == "COMPLETED" and rec["target_met"] is False
        assert rec["outcome"] == "budget spent" and rec["loss_meaning"] == LOSS_MEANING
        assert rec["metrics"]["step"] == 25 and rec["metrics"]["loss"] > 0
    assert {k: ran[k] for k in SAME} == {k: status[k] for k in SAME}
    chain = status["chain"]
    assert [(r["phase"], r["shape"], r["ranks"], r["exit_code"]) for r in chain] == \
        [("a", f"1x{first}", first, 3), ("b", f"1x{then}", then, 0)]
    # metrics.loss is the EMA metrics.jsonl calls loss_ema, not the last batch's loss.
    last = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()
            if "loss_ema" in json.loads(line)][-1]
    assert status["metrics"]["loss"] == pytest.approx(last["loss_ema"], rel=1e-12)


def test_result_carries_the_record_status_prints(tmp_path: Path, datasets: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmpi.api import submit
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEETMPI_PROGRESS", "none")
    job = submit(_spec(tmp_path, datasets["multiclass"], 2, 1, name="api"))
    res = job.result(timeout=240)
    by_dir: dict[str, Any] = json.loads(cli("status", str(res.job_dir), "--json", check=True,
                                            env={"FLEETMPI_HOME": str(tmp_path / "home")}).stdout)
    by_id: dict[str, Any] = json.loads(cli("status", str(job.id), "--json", check=True,
                                           env={"FLEETMPI_HOME": str(tmp_path / "home")}).stdout)
    assert {k: res.record[k] for k in SAME} == {k: by_dir[k] for k in SAME}
    assert res.exit_code == 0 and [r["ranks"] for r in res.chain] == [2, 1]
    for key in ("exit_code", "target_met", "outcome", "metrics", "chain", "loss_meaning"):
        assert by_id[key] == by_dir[key], key
