"""A continuation withdraws only the jobs its own rank 0 submitted ahead, never a later
submission of the manager or a user (fleetmpi.launch.slurm.batch._withdraw_ahead). No cluster:
scancel is replaced by a recorder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetmpi.jobdir import JobDir
from fleetmpi.launch.slurm import batch
from fleetmpi.launch.slurm.chain import record, runs


@pytest.fixture
def jd(tmp_path: Path) -> JobDir:
    j = JobDir(tmp_path / "job")
    (j.root / "slurm").mkdir(parents=True)
    return j


def _submit(jd: JobDir, job_id: str, by: str) -> None:
    record(jd, "submit", index=0, job_id=job_id, restart=0, phase="p", shape="1x1", key=f"k.{job_id}", by=by)


@pytest.mark.parametrize(("later", "withdrawn"), [
    ([("11", "rescale")], ["11"]),                      # rank 0 submitted the next phase ahead
    ([("11", "manager")], []),                          # the manager's retry after a NODE_FAIL
    ([("11", "manager"), ("12", "rescale")], []),       # ...whose own phase then submitted ahead
    ([("11", "resume")], []),                           # a user's `fleetmpi resume`
    ([], []),
])
def test_a_continuation_withdraws_only_its_own_submission_ahead(
        jd: JobDir, monkeypatch: pytest.MonkeyPatch, later: list[tuple[str, str]], withdrawn: list[str]) -> None:
    cancelled: list[str] = []
    monkeypatch.setattr(batch, "cancel", cancelled.append)
    monkeypatch.setattr(jd, "event", lambda *a, **k: None)
    _submit(jd, "10", "submit")
    for job_id, by in later:
        _submit(jd, job_id, by)
    batch._withdraw_ahead(jd, "10", 0, "phase p ended with exit code 1, not in a rescale")
    assert cancelled == withdrawn
    chain, _ = runs(jd)
    assert [r["job_id"] for r in chain] == ["10"] + [j for j, _ in later if j not in withdrawn]
