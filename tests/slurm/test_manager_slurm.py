"""The job manager on the real Slurm minicluster: many jobs within a limit, and a node that dies.

Both tests need the cluster (tests/slurm/slurm_fixtures.py starts it, or skips; with CI=true a
cluster that cannot start fails them). Nothing here is faked: the counting spies forward
every call to the real backend and the real Slurm commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import events, write_spec
from slurm_fixtures import slurm_cluster, wait_idle  # noqa: F401  (a fixture)

from fleetmpi import spec as specmod
from fleetmpi.api import queue as submit
from fleetmpi.jobdir import JobDir
from fleetmpi.jobs.backends import AllocState, Launch, SlurmJobs
from fleetmpi.jobs.ledger import ACTIVE, COMPLETED, TERMINAL, Ledger
from fleetmpi.jobs.manager import Manager, ManagerConfig
from fleetmpi.jobs.rows import AllocRow, JobRow
from fleetmpi.launch.slurm import batch as slurm_launch
from fleetmpi.launch.slurm.chain import runs

pytestmark = pytest.mark.slurm

# 200 is the acceptance number; a slower machine may run fewer (the report says how many).
MANY_JOBS = int(os.environ.get("FLEETMPI_TEST_MANY_JOBS", "200"))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEETMPI_PROGRESS", "none")
    return tmp_path / "home"


class SlurmSpy:
    """A spy on the real SlurmJobs and on every Slurm command it runs: counts, forwards all.

    ``where`` tells which manager step a command ran in ("poll", "launch" or "other"), so
    the squeue calls of one cycle can be told apart.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fleetmpi.launch.slurm import batch
        from fleetmpi.launch.slurm import cmd as slurm_cmd
        from fleetmpi.launch.slurm import submit as slurm_submit
        self.real, self.name = SlurmJobs(), SlurmJobs.name
        self.commands: list[tuple[str, str]] = []  # (command, where)
        self.launches: list[tuple[int, int]] = []  # (job id, attempt)
        self.polled: list[int] = []                # allocations passed to each poll
        self.where = "other"
        real_run = slurm_cmd.run_slurm

        def run_slurm(cmd: Sequence[str], **kw: Any) -> str:  # the real command runs
            self.commands.append((cmd[0], self.where))
            return real_run(cmd, **kw)

        # Every module that holds its own reference to the one door to Slurm.
        for module in (slurm_cmd, slurm_submit, batch):
            monkeypatch.setattr(module, "run_slurm", run_slurm)

    def squeues(self, where: str | None = None) -> int:
        return sum(1 for c, w in self.commands if c == "squeue" and (where is None or w == where))

    def launch(self, job: JobRow, attempt: int) -> Launch:
        self.launches.append((job.id, attempt))
        self.where = "launch"
        try:
            return self.real.launch(job, attempt)
        finally:
            self.where = "other"

    def poll(self, allocations: Sequence[AllocRow]) -> dict[str, AllocState]:
        self.polled.append(len(allocations))
        self.where = "poll"
        try:
            return self.real.poll(allocations)
        finally:
            self.where = "other"

    def cancel(self, allocation: AllocRow) -> None:
        self.real.cancel(allocation)


def _spec(tmp: Path, data: Path, name: str, partition: str, **sections: Any) -> Path:
    base: dict[str, Any] = {
        "name": name, "model": {"kind": "linear"}, "optimizer": {"lr": 0.05, "batch": 50},
        "goal": {"max_steps": 5}, "checkpoint": {"every_steps": 1000, "keep": 2},
        "monitor": {"log_every_steps": 5, "eval_every_steps": 5},
        "retry": {"max_attempts": 3, "backoff_s": 0}, "scheduler": {"backend": "slurm"},
        "fleet": {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 1, "partition": partition}}}}
    base.update(sections)
    return write_spec(tmp / f"{name}.yaml", data, **base)


def _most_at_once(allocs: Sequence[AllocRow]) -> int:
    """Return the most allocations live at one instant, from the ledger's start and end times."""
    edges = sorted([(a.started, 1) for a in allocs] + [(a.ended or float("inf"), -1) for a in allocs],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = live = 0
    for _, step in edges:
        live += step
        most = max(most, live)
    return most


def _jobcomp(cluster: Path, job_ids: Sequence[str]) -> list[dict[str, str]]:
    """Return the lines of the cluster's job completion log (no sacct here) about ``job_ids``.

    Slurm writes a line when a job has ended, which may be after its chain recorded the end:
    wait (bounded) until every id has one.
    """
    path, want = cluster / "log" / "jobcomp.txt", set(job_ids)
    deadline = time.monotonic() + 60
    while True:
        lines = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines()]
        mine = [c for c in lines if c.get("JobId") in want]
        if {c["JobId"] for c in mine} == want or time.monotonic() > deadline:
            return mine
        time.sleep(0.5)


def _chain(job_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (Path(job_dir) / "slurm" / "chain.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(max(600, 120 + 6 * MANY_JOBS))
def test_many_small_jobs_max_running_4_each_launched_once_one_squeue_per_cycle(
        tmp_path: Path, datasets: dict, slurm_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    t0 = time.monotonic()
    ledger = Ledger()
    ids = [submit(_spec(tmp_path, datasets["regression"], f"many{i}", ("cpu", "gpu")[i % 2]), ledger=ledger).id
           for i in range(MANY_JOBS)]
    queued_s = time.monotonic() - t0
    spy = SlurmSpy(monkeypatch)
    manager = Manager(ledger, ManagerConfig.resolve(max_running=4, poll_min_s=0.2, poll_max_s=1.0),
                      backends={"slurm": spy}, out=None)
    cycles: list[dict[str, int]] = []
    real_cycle = manager.cycle

    def counted_cycle() -> Any:
        before = (len(spy.commands), spy.squeues("poll"), spy.squeues("launch"), len(spy.launches), len(spy.polled))
        rep = real_cycle()
        after = (len(spy.commands), spy.squeues("poll"), spy.squeues("launch"), len(spy.launches), len(spy.polled))
        squeue_all = sum(1 for c, _ in spy.commands[before[0]:] if c == "squeue")
        cycles.append({"squeue": squeue_all, "poll_squeue": after[1] - before[1],
                       "launch_squeue": after[2] - before[2], "launches": after[3] - before[3],
                       "polls": after[4] - before[4], "active": len(ledger.jobs(ACTIVE))})
        return rep

    monkeypatch.setattr(manager, "cycle", counted_cycle)
    deadline = time.monotonic() + 60 + 6 * MANY_JOBS  # a hang fails instead of running forever
    manager.run(until_idle=True, stop=lambda: time.monotonic() > deadline)
    ran_s = time.monotonic() - t0 - queued_s
    print(f"\n{MANY_JOBS} jobs: queued in {queued_s:.1f} s, ran in {ran_s:.1f} s ({ran_s / MANY_JOBS:.2f} s per job "
          f"at max_running 4), {len(cycles)} cycles, {spy.squeues()} squeue calls "
          f"({spy.squeues('poll')} polling, {spy.squeues('launch')} submission-key lookups)")
    assert ledger.idle(), f"not done after {ran_s:.0f} s: {[(j.id, j.status) for j in ledger.jobs(ACTIVE)]}"

    # All reached COMPLETED, each attempt launched exactly once (one allocation, one sbatch).
    jobs = [ledger.get(i) for i in ids]
    assert [j.id for j in jobs if j.status != COMPLETED] == [], {j.id: j.last_error for j in jobs
                                                                  if j.status != COMPLETED}
    comp = _jobcomp(slurm_cluster, [a.backend_id for a in ledger.allocations()])
    for job in jobs:
        allocs = ledger.allocations(job.id)
        attempts = sorted(a for j, a in spy.launches if j == job.id)
        assert attempts == [a.attempt for a in allocs] == list(range(1, job.attempts + 1)), job.id
        assert allocs[-1].state == "COMPLETED" and allocs[-1].exit_code == 0
        submitted = [r["job_id"] for r in _chain(job.job_dir) if r["kind"] == "submit"]
        assert len(submitted) == job.attempts and [a.backend_id for a in allocs] == submitted
        # Slurm itself ran exactly these jobs for this job dir: no second sbatch of one attempt.
        ran = {c["JobId"] for c in comp if c.get("WorkDir") == job.job_dir}
        assert ran == set(submitted), (job.id, ran, submitted)
        assert job.progress["step"] == 5

    # Never more than 4 running at once, and the limit was used.
    assert max(c["active"] for c in cycles) == 4
    assert _most_at_once(ledger.allocations()) == 4
    # Polling asks ONE squeue per cycle, however many allocations are live.
    assert all(c["polls"] <= 1 and c["poll_squeue"] <= 1 for c in cycles)
    assert max(spy.polled) >= 4 and max(c["poll_squeue"] for c in cycles) == 1
    # And nothing else: a first sbatch of a fresh key needs no key lookup (its intent is
    # recorded first), so a whole manager cycle, launches included, asks squeue at most once.
    assert all(c["squeue"] <= 1 for c in cycles), [c for c in cycles if c["squeue"] > 1][:3]
    assert spy.squeues("launch") == 0
    assert len(spy.launches) == sum(j.attempts for j in jobs)


def _squeue(job_id: str, fmt: str) -> str:
    return subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={job_id}", f"--format={fmt}"],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%T"],
                          capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture
def downed_nodes() -> Iterator[list[str]]:
    """Nodes a test sets DOWN; each is resumed afterwards, whatever happened (the cluster is shared)."""
    nodes: list[str] = []
    yield nodes
    for node in nodes:
        proc = subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"],
                              capture_output=True, text=True, timeout=30)
        # ReturnToService=2 may have brought it back already; then resume is refused as invalid.
        deadline = time.monotonic() + 60
        while any(s in _node_state(node) for s in ("down", "drain", "fail")):
            assert time.monotonic() < deadline, f"{node} stays {_node_state(node)} after resume: {proc.stderr}"
            time.sleep(0.5)


@pytest.mark.slow
def test_node_failure_ends_node_fail_and_is_retried_from_the_checkpoint(
        tmp_path: Path, datasets: dict, slurm_cluster: Path, downed_nodes: list[str]) -> None:  # noqa: F811
    spec = _spec(tmp_path, datasets["regression"], "nodefail", "gpu", optimizer={"lr": 0.01, "batch": 50},
                 goal={"max_steps": 150_000}, checkpoint={"every_steps": 500, "keep": 2},
                 monitor={"log_every_steps": 500, "eval_every_steps": 5000})
    ledger = Ledger()
    job = submit(spec, ledger=ledger)
    jd = Path(job.job_dir)
    manager = Manager(ledger, ManagerConfig.resolve(poll_min_s=0.1, poll_max_s=0.5), backends={"slurm": SlurmJobs()},
                      out=None)
    wait_idle()  # the node is about to go down: spare other sessions' jobs where we can

    def checkpointed() -> list[dict[str, Any]]:
        try:
            return [e for e in events(jd) if e["event"] == "checkpoint"]
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the job never checkpointed while RUNNING"
        manager.cycle()
        assert job.status() not in TERMINAL, "the job ended before its node could be taken down"
        live = ledger.allocations(job.id, live=True)
        if live and checkpointed():
            slurm_id = live[0].backend_id
            state, _, node = _squeue(slurm_id, "%T|%N").partition("|")
            if state == "RUNNING" and node:
                break
        time.sleep(0.05)
    downed_nodes.append(node)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=fleetmpi-test"], check=True,
                   capture_output=True, text=True, timeout=30)
    ckpt_before = max(e["step"] for e in checkpointed())
    assert ckpt_before > 0

    deadline = time.monotonic() + 300
    while job.status() not in TERMINAL:
        assert time.monotonic() < deadline, f"job still {job.status()} after its node failed"
        manager.cycle()
        time.sleep(0.1)

    # Slurm says NODE_FAIL (squeue and the completion log) and did not requeue the job itself.
    assert _squeue(slurm_id, "%T") == "NODE_FAIL"
    assert [c["JobState"] for c in _jobcomp(slurm_cluster, [slurm_id])] == ["NODE_FAIL"]
    row = job.row()
    assert (row.status, row.attempts, row.failures) == (COMPLETED, 2, 1), row.last_error
    first, second = ledger.allocations(job.id)
    assert (first.backend_id, first.state, first.exit_code) == (slurm_id, "NODE_FAIL", None), first
    assert (second.state, second.exit_code) == ("COMPLETED", 0) and second.backend_id != slurm_id
    # Classified transient: back to NEW as retry 1, then relaunched by the manager.
    to_new = [e["data"]["reason"] for e in ledger.events(job.id, "status") if e["data"]["to"] == "NEW"]
    assert len(to_new) == 1 and "retry 1 of 2" in to_new[0] and "allocation NODE_FAIL" in to_new[0], to_new
    chain = _chain(job.job_dir)
    assert [(r["job_id"], r["by"]) for r in chain if r["kind"] == "submit"] == [(slurm_id, "manager"),
                                                                                 (second.backend_id, "manager")]
    assert not [r for r in chain if r.get("restart", 0) > 0], "Slurm requeued the job as well"
    # Resumed from the newest checkpoint the lost run wrote, and reached the goal.
    ev = events(jd)
    [resume] = [e for e in ev if e["event"] == "resume"]
    before_resume = [e["step"] for e in ev[:ev.index(resume)] if e["event"] == "checkpoint"]
    assert resume["step"] == max(before_resume) >= ckpt_before > 0
    assert Path(resume["checkpoint"]).name == f"step-{resume['step']:08d}.h5"
    assert [e for e in ev if e["event"] == "goal"][-1]["step"] == 150_000


def test_a_step_that_exits_0_short_of_the_goal_never_ends_the_chain_completed(
        tmp_path: Path, datasets: dict, slurm_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """srun exits 0 when its node fails; where Slurm cannot say so either, the chain still claims no goal."""
    sp = specmod.load(_spec(tmp_path, datasets["regression"], "short", "cpu"))
    jd = JobDir(tmp_path / "job")
    jd.create(specmod.dump(sp), "one", "slurm")
    jd.update_state(status="STOPPED")  # what the ranks leave after a signal
    # A job id Slurm does not know stands in for a squeue that cannot tell (a fault injector).
    monkeypatch.setenv("SLURM_JOB_ID", "999999999")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm_launch.after(jd, "one", 0) == 1
    _, end = runs(jd)
    assert end is not None and end["status"] == "FAILED" and "did not reach its goal" in end["reason"], end
    assert jd.read_state()["status"] == "FAILED"
