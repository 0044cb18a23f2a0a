"""A Slurm rescale's next job, submitted by rank 0 ahead of the old job's exit.

Rank 0 submits the next phase once the rescale's checkpoint is committed
(fleetmpi.launch.slurm.batch.submit_ahead). The two jobs of the chain must still never write
the job dir at once (the new job's `begin` waits for the old batch shell's lock), and a job
submitted ahead for a rescale that did not happen is withdrawn and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cli, events, write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401  (a fixture)

from fleetmpi.errors import ExitCode
from fleetmpi.jobdir import JobDir
from fleetmpi.launch.slurm import batch
from fleetmpi.launch.slurm.backend import SlurmBackend
from fleetmpi.launch.slurm.chain import chain_path, env_path, record, runs
from fleetmpi.spec import dump, load


def _records(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in chain_path(JobDir(job)).read_text().splitlines()]


@pytest.mark.slurm
def test_rescale_submits_the_next_job_ahead_and_it_writes_only_after_the_old_job_let_go(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    # 1x1 -> 2x1 on partition cpu: the wide job fits beside the old one, so Slurm may start it
    # while the old job still exits; its `begin` must wait for the old continuation all the same.
    fleet = {"start": "small",
             "phases": {"small": {"nodes": 1, "ranks_per_node": 1, "partition": "cpu"},
                        "wide": {"nodes": 2, "ranks_per_node": 1, "partition": "cpu"}},
             "rules": [{"in": "small", "when": "step >= 20", "then": {"goto": "wide"}}]}
    spec = write_spec(tmp_path / "spec.yaml", datasets["multiclass"], fleet=fleet, goal={"max_steps": 40})
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--backend", "slurm", "--wait", "--json", "--job-dir", str(job), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [(r["phase"], r["shape"], r["by"], r["exit_code"]) for r in out["chain"]] == [
        ("small", "1x1@cpu", "submit", 3), ("wide", "2x1@cpu", "rescale", 0)]
    old, new = (r["job_id"] for r in out["chain"])
    ev = events(job)
    submitted = next(e for e in ev if e["event"] == "slurm_submit" and e["job_id"] == new)
    old_exit = next(e for e in ev if e["event"] == "slurm_exit" and e["job_id"] == old)
    assert submitted["by"] == "rescale" and submitted["t"] < old_exit["t"]   # ahead of the old job's exit
    recs = _records(job)
    exit_rec = next(r for r in recs if r["kind"] == "exit" and r["job_id"] == old)
    start_rec = next(r for r in recs if r["kind"] == "start" and r["job_id"] == new)
    # One writer at a time: the new job took the lock only after the old continuation's records.
    assert start_rec["t"] > exit_rec["t"]
    assert recs.index(start_rec) > recs.index(exit_rec)
    started = next(e for e in ev if e["event"] == "slurm_start" and e["job_id"] == new)
    assert started["startup"]["locked"] >= exit_rec["t"]
    assert [(e["phase"], e["ranks"], e["step"]) for e in ev if e["event"] == "phase_start"] == [
        ("small", 1, 0), ("wide", 2, 20)]
    # Exactly one job of the wide phase (the continuation did not submit it a second time).
    assert sum(1 for r in recs if r["kind"] == "submit" and r["phase"] == "wide") == 1
    assert not any(r["kind"] == "withdraw" for r in recs)


def _chain_with_job_ahead(tmp_path: Path, datasets: dict) -> JobDir:
    """Return a job dir whose phase `small` (Slurm job 101) rescaled to `wide`, job 102 submitted ahead."""
    fleet = {"start": "small",
             "phases": {"small": {"nodes": 1, "ranks_per_node": 1}, "wide": {"nodes": 2, "ranks_per_node": 1}},
             "rules": [{"in": "small", "when": "step >= 20", "then": {"goto": "wide"}}]}
    spec_path = write_spec(tmp_path / "spec.yaml", datasets["multiclass"], fleet=fleet,
                           scheduler={"backend": "slurm"})
    sp = load(spec_path)
    jd = JobDir(tmp_path / "job")
    jd.create(dump(sp), "small", "slurm")
    record(jd, "submit", index=0, job_id="101", restart=0, phase="small", shape="1x1", key="k.0", by="submit")
    record(jd, "start", job_id="101", restart=0, phase="small", env={})
    record(jd, "submit", index=1, job_id="102", restart=0, phase="wide", shape="2x1", key="k.1", by="rescale")
    jd.update_state(phase="wide")
    return jd


def test_a_phase_that_ends_otherwise_withdraws_the_job_submitted_ahead_which_then_writes_nothing(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    jd = _chain_with_job_ahead(tmp_path, datasets)
    cancelled: list[str] = []
    monkeypatch.setattr(batch, "cancel", cancelled.append)
    monkeypatch.setattr(batch, "_lost_state", lambda _job_id: None)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    # The ranks crashed after rank 0 had submitted the wide phase: no rescale happens.
    assert batch.after(jd, "small", ExitCode.FAILED) == ExitCode.FAILED
    assert cancelled == ["102"]
    chain, end = runs(jd)
    assert [(r["job_id"], r["exit_code"]) for r in chain] == [("101", ExitCode.FAILED)]
    assert end is not None and end["status"] == "FAILED"
    assert json.loads(jd.state_path.read_text())["backend_ids"] == ["101"]
    # Had scancel come too late, job 102's batch steps would find it is no run of the chain.
    before = chain_path(jd).read_text()
    state_before = jd.state_path.read_text()
    monkeypatch.setenv("SLURM_JOB_ID", "102")
    for step in (["begin", str(jd.root), "--phase", "wide"],
                 ["continue", str(jd.root), "--phase", "wide", "--exit-code", "2"]):
        assert batch.main(step) == ExitCode.BAD_INPUT
    assert chain_path(jd).read_text() == before and jd.state_path.read_text() == state_before
    assert not env_path(jd, "102", 0).exists()


def test_the_continuation_of_a_rescale_does_not_submit_the_job_submitted_ahead_again(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    jd = _chain_with_job_ahead(tmp_path, datasets)
    cancelled: list[str] = []
    monkeypatch.setattr(batch, "cancel", cancelled.append)

    def no_sbatch(*_a: Any, **_k: Any) -> str:
        raise AssertionError("the continuation submitted the phase a second time")

    monkeypatch.setattr(SlurmBackend, "submit", no_sbatch)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert batch.after(jd, "small", ExitCode.RESCALE) == ExitCode.OK
    assert cancelled == []
    chain, end = runs(jd)
    assert [(r["job_id"], r["phase"], r["exit_code"]) for r in chain] == [
        ("101", "small", ExitCode.RESCALE), ("102", "wide", None)]
    assert end is None
    assert yaml.safe_load(jd.spec.read_text())["scheduler"]["backend"] == "slurm"


def test_a_continuation_that_crashes_withdraws_the_job_submitted_ahead_before_ending_the_chain(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    jd = _chain_with_job_ahead(tmp_path, datasets)
    cancelled: list[str] = []
    monkeypatch.setattr(batch, "cancel", cancelled.append)

    def crash(*_a: Any, **_k: Any) -> int:
        raise RuntimeError("injected")

    monkeypatch.setattr(batch, "after", crash)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("FLEETMPI_LOCK_FD", raising=False)
    assert batch.main(["continue", str(jd.root), "--phase", "small", "--exit-code", "3"]) == ExitCode.FAILED
    assert cancelled == ["102"]
    chain, end = runs(jd)
    assert [r["job_id"] for r in chain] == ["101"]
    assert end is not None and end["status"] == "FAILED" and "injected" in end["reason"]


def test_the_job_submitted_ahead_gets_the_batch_environment_without_the_ranks_step_variables(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    jd = _chain_with_job_ahead(tmp_path, datasets)
    record(jd, "withdraw", job_id="102", restart=0, phase="wide", reason="test: none submitted yet")
    seen: list[dict[str, str]] = []

    def fake_submit(_self: Any, phase: str, by: str, env: dict[str, str] | None = None) -> str:
        assert (phase, by) == ("wide", "rescale") and env is not None
        seen.append(env)
        return "103"

    monkeypatch.setattr(SlurmBackend, "submit", fake_submit)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    # What srun --mpi=pmi2 gave rank 0 of job 101 on the minicluster, beside the batch shell's.
    step = {"PMI_FD": "7", "PMI_RANK": "0", "PMI_SIZE": "2", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_SRUN_COMM_PORT": "4242", "SLURM_MPI_TYPE": "pmi2"}
    shell = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "MY_SETTING": "kept"}
    for k, v in {**step, **shell}.items():
        monkeypatch.setenv(k, v)
    assert batch.submit_ahead(jd, load(jd.spec), "wide") == "103"
    (env,) = seen
    assert not set(step) & set(env)
    assert {k: env[k] for k in shell} == shell and env["SLURM_JOB_ID"] == "101"
    # Not the chain's running job (no `start` of it): nothing is submitted ahead.
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    assert batch.submit_ahead(jd, load(jd.spec), "wide") is None and len(seen) == 1


def test_cancel_in_a_rescales_last_moments_cancels_the_old_job_and_the_one_submitted_ahead(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between rank 0's submission ahead and the old continuation's exit record the chain has two
    # live jobs; cancelling only the newest left the old one to continue the chain.
    import fleetmpi.launch.slurm.submit as submit_mod
    from fleetmpi.jobs.backends import SlurmJobs
    from fleetmpi.jobs.rows import AllocRow
    from fleetmpi.launch.slurm.chain import live_job_ids

    jd = _chain_with_job_ahead(tmp_path, datasets)
    assert live_job_ids(runs(jd)[0]) == ["101", "102"]
    cancelled: list[str] = []
    monkeypatch.setattr(submit_mod, "cancel", cancelled.append)
    alloc = AllocRow(id=1, job_id=1, attempt=1, backend="slurm", backend_id="101", host=None, phase="small",
                     shape="1x1", state="RUNNING", exit_code=None, log=None, info={"job_dir": str(jd.root)},
                     started=0.0, ended=None, reason=None)
    SlurmJobs().cancel(alloc)
    assert cancelled == ["101", "102"]
    assert [e["job_id"] for e in events(jd.root) if e["event"] == "cancel_requested"] == ["101", "102"]
    # Once the old job's continuation recorded its exit, only the job submitted ahead is live.
    record(jd, "exit", job_id="101", restart=0, phase="small", exit_code=3)
    assert live_job_ids(runs(jd)[0]) == ["102"]


def test_a_failing_submission_ahead_is_recorded_and_never_raises_into_the_rank(
        tmp_path: Path, datasets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    jd = _chain_with_job_ahead(tmp_path, datasets)

    def broken(*_a: Any, **_k: Any) -> str:
        raise RuntimeError("injected: sbatch vanished")

    monkeypatch.setattr(batch, "_submit_ahead", broken)
    assert batch.submit_ahead(jd, load(jd.spec), "wide") is None
    (failed,) = [e for e in events(jd.root) if e["event"] == "slurm_submit_ahead_failed"]
    assert failed["phase"] == "wide" and "injected: sbatch vanished" in failed["error"]
