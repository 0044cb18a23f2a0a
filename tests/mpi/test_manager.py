"""The job manager on real local jobs: real mpiexec, real SQLite, real processes and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest
from conftest import cli, events, write_spec
from slurm_fixtures import slurm_cluster  # noqa: F401 - the Slurm tier's fixture, used by name

from fleetmpi.api import Job, JobFailed
from fleetmpi.api import queue as submit
from fleetmpi.errors import BadInput
from fleetmpi.jobdir import JobDir
from fleetmpi.jobs.backends import AllocState, Launch, LocalJobs
from fleetmpi.jobs.ledger import ACTIVE, CANCELLED, COMPLETED, FAILED, TERMINAL, Ledger
from fleetmpi.jobs.manager import Manager, ManagerConfig, classify, next_interval
from fleetmpi.jobs.notify import render_command
from fleetmpi.jobs.rows import AllocRow, JobRow


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLEETMPI_PROGRESS", "none")
    return tmp_path / "home"


def tiny(tmp: Path, data: Path, name: str = "t", **sections: Any) -> Path:
    """A one-rank spec that finishes in a few steps; retries without backoff."""
    base: dict[str, Any] = {"name": name, "goal": {"max_steps": 6}, "checkpoint": {"every_steps": 3, "keep": 2},
                            "monitor": {"log_every_steps": 1, "eval_every_steps": 3},
                            "retry": {"max_attempts": 3, "backoff_s": 0}}
    base.update(sections)
    return write_spec(tmp / f"{name}.yaml", data, **base)


class PollSpy:
    """A spy on a real backend: counts launch and poll calls, forwards every one."""

    def __init__(self, real: Any, inner: Callable[[], int] = lambda: 0) -> None:
        self.real, self.name, self.inner = real, real.name, inner
        self.polls: list[int] = []     # number of allocations passed to each poll call
        self.inner_calls: list[int] = []  # inner() counted during each poll (Slurm: squeue calls)
        self.launches: list[int] = []  # job ids

    def launch(self, job: JobRow, attempt: int) -> Launch:
        self.launches.append(job.id)
        return self.real.launch(job, attempt)

    def poll(self, allocations: Sequence[AllocRow]) -> dict[str, AllocState]:
        self.polls.append(len(allocations))
        before = self.inner()
        try:
            return self.real.poll(allocations)
        finally:
            self.inner_calls.append(self.inner() - before)

    def cancel(self, allocation: AllocRow) -> None:
        self.real.cancel(allocation)


def drive(manager: Manager, until: Any, timeout: float = 180.0, pause: float = 0.05) -> None:
    """Run manager cycles until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "manager did not get there in time"
        manager.cycle()
        time.sleep(pause)


def fast_config(**kw: Any) -> ManagerConfig:
    return ManagerConfig.resolve(poll_min_s=0.05, poll_max_s=0.2, notify_backoff_s=0, **kw)


@pytest.mark.slow
def test_twelve_jobs_two_at_a_time_each_launched_once_one_poll_per_cycle(tmp_path: Path, datasets: dict) -> None:
    spec = tiny(tmp_path, datasets["regression"], model={"kind": "linear"}, optimizer={"lr": 0.05, "batch": 50})
    ledger = Ledger()
    ids = [submit(spec, overrides=[f"name=t{i}"], ledger=ledger).id for i in range(12)]
    spy = PollSpy(LocalJobs())
    manager = Manager(ledger, fast_config(max_running=2), backends={"local": spy}, out=None)
    most_active = 0
    deadline = time.monotonic() + 240
    while not ledger.idle():
        assert time.monotonic() < deadline
        before = len(spy.polls)
        rep = manager.cycle()
        assert len(spy.polls) - before <= 1 and rep.polls.get("local", 0) == len(spy.polls) - before
        most_active = max(most_active, len(ledger.jobs(ACTIVE)))
        time.sleep(0.05)
    assert most_active == 2 and max(spy.polls) == 2  # never more than two live allocations
    assert sorted(spy.launches) == ids  # every job launched once
    for job_id in ids:
        job = ledger.get(job_id)
        assert job.status == COMPLETED, (job.status, job.last_error)
        assert job.attempts == 1 and job.failures == 0 and job.progress["step"] == 6
        [alloc] = ledger.allocations(job_id)
        assert (alloc.state, alloc.exit_code, alloc.attempt) == ("COMPLETED", 0, 1)
        assert Path(alloc.log).name == "manager-attempt-1.log" and Path(alloc.log).is_file()


def _ranks(runner_pid: int) -> list[psutil.Process]:
    kids = psutil.Process(runner_pid).children(recursive=True)
    return [k for k in kids if k.cmdline()[1:3] == ["-m", "fleetmpi.engine.worker"]]


@pytest.mark.slow
def test_killed_ranks_are_retried_from_the_checkpoint(tmp_path: Path, datasets: dict) -> None:
    # The kill comes at the first checkpoint (step 100); the retry trains the rest: 20000 steps
    # leave the kill most of a second on a quiet machine (50000 cost minutes on a loaded one).
    spec = tiny(tmp_path, datasets["regression"], model={"kind": "linear"}, optimizer={"lr": 0.05, "batch": 50},
                goal={"max_steps": 20000}, checkpoint={"every_steps": 100, "keep": 2},
                monitor={"log_every_steps": 100, "eval_every_steps": 100})
    ledger = Ledger()
    job = submit(spec, ledger=ledger)
    manager = Manager(ledger, fast_config(), out=None)
    jd = JobDir(job.job_dir)
    drive(manager, lambda: jd.events.exists() and any(e["event"] == "checkpoint" for e in events(jd.root)),
          pause=0.01)
    [alloc] = ledger.allocations(job.id, live=True)
    ranks = _ranks(alloc.info["pid"])
    assert ranks, "the job ended before its ranks could be killed"
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    drive(manager, lambda: job.status() in TERMINAL)
    row = job.row()
    assert row.status == COMPLETED, row.last_error
    first, second = ledger.allocations(job.id)
    assert first.exit_code not in (0, 1, 2, 3, 4) and "killed" in first.reason, first
    assert second.state == "COMPLETED" and row.failures == 1 and row.attempts == 2
    resumed = [e for e in events(jd.root) if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 100
    assert [e for e in events(jd.root) if e["event"] == "goal"][-1]["step"] == 20000
    assert "retry 1 of 2" in [e for e in ledger.events(job.id, "status") if e["data"]["to"] == "NEW"][0]["data"]["reason"]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"path": self.path, "type": self.headers["Content-Type"], "json": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Any:
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_nan_fails_with_reason_without_retry_and_webhook_gets_json(tmp_path: Path, datasets: dict,
                                                                   webhook: Any) -> None:
    url, received = webhook
    spec = tiny(tmp_path, datasets["regression"], name="nan", model={"kind": "linear"},
                optimizer={"kind": "sgd", "lr": 50.0, "batch": 40}, goal={"max_steps": 500},
                notify=[{"webhook": url}])
    job = submit(spec)
    with pytest.raises(JobFailed, match=r"training loss is .*; log: .*manager-attempt-1\.log") as err:
        job.result(timeout=120)
    assert err.value.status == FAILED
    row = job.row()
    assert row.attempts == 1 and row.failures == 0 and len(job.ledger.allocations(job.id)) == 1
    assert Path(row.last_error.rsplit("log: ", 1)[1]).is_file()
    assert len(received) == 1
    hook = received[0]
    assert hook["path"] == "/hook" and hook["type"] == "application/json"
    assert hook["json"]["job"] == job.id and hook["json"]["status"] == FAILED
    assert "training loss is" in hook["json"]["reason"] and hook["json"]["name"] == "nan"


DRIVER = """
import json, subprocess, sys, time
deadline = time.time() + 200
while time.time() < deadline:
    p = subprocess.run([sys.executable, "-m", "fleetmpi.cli", "manager", "--once", "--json", "--max-running", "6",
                        "--poll-min-s", "0.05"], capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    if json.loads(p.stdout.splitlines()[-1])["idle"]:
        sys.exit(0)
sys.exit("not idle in time")
"""

NOTIFIER = """
import sys
with open(sys.argv[1], "a") as f:
    f.write("\\t".join(sys.argv[2:]) + "\\n")
"""


@pytest.mark.slow
def test_two_managers_launch_each_job_once_and_notify_once(tmp_path: Path, datasets: dict, home: Path) -> None:
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "notifier.py").write_text(NOTIFIER)
    calls = tmp_path / "calls.txt"
    command = f"{sys.executable} {tmp_path / 'notifier.py'} {calls} {{job}} {{status}} '{{reason}}'"
    spec = tiny(tmp_path, datasets["regression"], model={"kind": "linear"}, optimizer={"lr": 0.05, "batch": 50},
                goal={"max_steps": 4}, notify=[{"command": command}])
    ledger = Ledger()
    ids = [submit(spec, overrides=[f"name=m{i}"], ledger=ledger).id for i in range(6)]
    env = {**os.environ, "FLEETMPI_HOME": str(home)}
    drivers = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    for d in drivers:
        _, err = d.communicate(timeout=240)
        assert d.returncode == 0, err
    claimers = set()
    for job_id in ids:
        job = ledger.get(job_id)
        assert job.status == COMPLETED, job.last_error
        assert job.attempts == 1 and len(ledger.allocations(job_id)) == 1
        claimed = ledger.events(job_id, "claimed")
        assert len(claimed) == 1
        claimers.add(claimed[0]["data"]["by"])
    lines = [line.split("\t") for line in calls.read_text().splitlines()]
    assert sorted(int(job) for job, _, _ in lines) == ids  # one call per terminal job
    assert {status for _, status, _ in lines} == {COMPLETED}


@pytest.mark.slow
def test_cancel_stops_the_ranks_after_a_checkpoint(tmp_path: Path, datasets: dict, home: Path) -> None:
    spec = tiny(tmp_path, datasets["regression"], name="long", model={"kind": "linear"},
                optimizer={"lr": 0.01, "batch": 50}, goal={"max_steps": 10**7}, checkpoint={"every_steps": 10**6},
                monitor={"log_every_steps": 1000, "eval_every_steps": 1000})
    ledger = Ledger()
    job = submit(spec, ledger=ledger)
    manager = Manager(ledger, fast_config(), out=None)
    drive(manager, lambda: job.status() == "RUNNING" and any(e["event"] == "first_step" for e in events(job.job_dir)))
    proc = cli("cancel", str(job.id), env={"FLEETMPI_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM sent to 1 allocation" in proc.stderr
    assert job.status() == CANCELLED
    drive(manager, lambda: not ledger.allocations(job.id, live=True))
    [alloc] = ledger.allocations(job.id)
    assert alloc.exit_code == 4 and job.status() == CANCELLED
    ev = events(job.job_dir)
    sig = [e for e in ev if e["event"] == "signal"]
    assert sig and sig[0]["signal"] == "SIGTERM"
    assert [e for e in ev if e["event"] == "checkpoint"][-1]["reason"] == "signal SIGTERM"
    again = cli("cancel", str(job.id), env={"FLEETMPI_HOME": str(home)})
    assert again.returncode == 2 and "already CANCELLED" in again.stderr


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_api_wait_result_status_and_report(tmp_path: Path, datasets: dict, home: Path) -> None:
    import fleetmpi
    from fleetmpi.jobs.report import plot
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": 1}, "b": {"ranks_per_node": 2}},
             "rules": [{"in": "a", "when": "step >= 10", "then": {"goto": "b"}}]}
    spec = tiny(tmp_path, datasets["multiclass"], name="api", goal={"max_steps": 25}, fleet=fleet,
                checkpoint={"every_steps": 10, "keep": 2}, monitor={"log_every_steps": 1, "eval_every_steps": 5})
    job = fleetmpi.submit(spec)   # starts now, unlike fleetmpi.queue
    assert isinstance(job, Job) and job.status() == "LAUNCHED" and len(job.ledger.allocations(job.id, live=True)) == 1
    result = job.result(timeout=180)
    assert result.model.is_file() and result.metrics["step"] == 25 and result.metrics["loss"] > 0
    row = job.row()
    assert (row.status, row.phase, row.shape, row.attempts) == (COMPLETED, "b", "1x2", 1)
    assert [e["data"]["to"] for e in job.ledger.events(job.id, "status")] == ["RUNNING", "RESCALING", "RUNNING",
                                                                               COMPLETED]
    env = {"FLEETMPI_HOME": str(home)}
    info = json.loads(cli("status", str(job.id), "--json", env=env, check=True).stdout)
    assert info["status"] == COMPLETED and info["step"] == 25 and info["ranks"] == 2 and info["attempts"] == 1
    assert info["allocations"][0]["exit_code"] == 0
    table = cli("status", env=env, check=True).stdout
    assert table.splitlines()[0].split()[:4] == ["ID", "NAME", "STATUS", "PHASE"] and "COMPLETED" in table
    assert any(e["event"] == "rescale" for e in (json.loads(x) for x in
                                                  cli("events", "api", "--json", env=env, check=True).stdout.split("\n")
                                                  if x))

    out = tmp_path / "report.png"
    rep = json.loads(cli("report", str(job.id), "--out", str(out), "--json", env=env, check=True).stdout)
    assert rep["axes"] == 3 and rep["phases"] == 2 and rep["bytes"] == out.stat().st_size > 0
    width, height = _png_size(out)
    assert width > 100 and height > 100
    fig = plot(JobDir(job.job_dir))
    assert len(fig.axes) == 3
    assert all(ax.get_xlabel() == "" for ax in fig.axes[:2]) and fig.axes[2].get_xlabel() == "step"
    # one dashed boundary per panel, at the first step of phase b
    for ax in fig.axes:
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(dashed) == 1 and 10 <= dashed[0].get_xdata()[0] <= 12


def test_sweep_queues_the_cartesian_product(tmp_path: Path, datasets: dict, home: Path) -> None:
    spec = tiny(tmp_path, datasets["regression"], name="sw", model={"kind": "linear"})
    env = {"FLEETMPI_HOME": str(home)}
    proc = cli("sweep", str(spec), "--grid", "optimizer.lr=0.1,0.05", "--grid", "optimizer.batch=40,50,60",
               "--set", "goal.max_steps=5", "--json", env=env, check=True)
    recs = json.loads(proc.stdout)
    assert len(recs) == 6 and {r["status"] for r in recs} == {"NEW"}
    names = [r["name"] for r in recs]
    assert len(set(names)) == 6 and names[0] == "sw-lr0.1-batch40"
    import yaml
    seen = set()
    for r in recs:
        stored = yaml.safe_load((Path(r["job_dir"]) / "spec.yaml").read_text())
        seen.add((stored["optimizer"]["lr"], stored["optimizer"]["batch"]))
        assert stored["goal"]["max_steps"] == 5 and stored["name"] == r["name"]
    assert seen == {(lr, b) for lr in (0.1, 0.05) for b in (40, 50, 60)}
    bad = cli("sweep", str(spec), "--grid", "optimizer.lr=0.1,-2", env=env)
    assert bad.returncode == 2 and "optimizer.lr" in bad.stderr
    full = cli("queue", str(spec), "--max-queued", "6", env=env)
    assert full.returncode == 2 and "limit" in full.stderr
    assert len(Ledger().jobs()) == 6


def test_poll_interval_backs_off_from_2_to_60_s_while_nothing_changes() -> None:
    cfg = ManagerConfig.resolve()
    assert (cfg.poll_min_s, cfg.poll_max_s) == (2.0, 60.0)
    seen, interval = [], cfg.poll_min_s
    for _ in range(7):
        interval = next_interval(interval, False, cfg)
        seen.append(interval)
    assert seen == [4, 8, 16, 32, 60, 60, 60]
    assert next_interval(60, True, cfg) == 2


def test_classification_of_ended_allocations() -> None:
    cases = {("COMPLETED", 0): "done", ("FAILED", 1): "fail", ("FAILED", 2): "fail", ("FAILED", 4): "retry",
             ("FAILED", 9): "retry", ("FAILED", 137): "retry", ("FAILED", -9): "retry", ("FAILED", 3): "continue",
             ("NODE_FAIL", None): "retry", ("BOOT_FAIL", None): "retry", ("PREEMPTED", None): "retry",
             ("LOST", None): "retry", ("OUT_OF_MEMORY", None): "fail", ("CANCELLED", 4): "cancelled",
             ("CHAIN_STOPPED", 4): "fail"}
    for (state, code), want in cases.items():
        assert classify(AllocState(state, code), has_checkpoint=True)[0] == want, (state, code)
    assert classify(AllocState("TIMEOUT"), has_checkpoint=True)[0] == "continue"
    assert classify(AllocState("TIMEOUT"), has_checkpoint=False)[0] == "fail"


def test_manager_settings_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETMPI_MAX_RUNNING", "7")
    assert ManagerConfig.resolve().max_running == 7
    assert ManagerConfig.resolve(max_running=3).max_running == 3
    monkeypatch.setenv("FLEETMPI_MAX_RUNNING", "many")
    with pytest.raises(BadInput, match="FLEETMPI_MAX_RUNNING='many': expected an integer"):
        ManagerConfig.resolve()
    with pytest.raises(BadInput, match="--poll-min-s=0"):
        ManagerConfig.resolve(max_running=1, poll_min_s=0)


def test_import_fleetmpi_stays_light() -> None:
    code = ("import sys, fleetmpi; heavy = {'fleetmpi.api', 'sqlite3', 'numpy', 'matplotlib'} & set(sys.modules); "
            "assert not heavy, heavy; assert fleetmpi.submit.__module__ == 'fleetmpi.api'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- notifiers (no jobs run: a job is made terminal through the ledger API) -------------------

def _terminal_job(ledger: Ledger, tmp: Path, notify: list[dict[str, Any]], reason: str) -> int:
    def make_dir(job_id: int) -> str:
        (tmp / f"j{job_id}").mkdir()
        return str(tmp / f"j{job_id}")
    job = ledger.add_job(name="n", spec_path="s", spec_hash="h", backend="local", phase="one", shape="1x1",
                         max_attempts=1, backoff_s=0, notify=notify, make_dir=make_dir)
    ledger.claim(job, "test", now=time.time())
    assert ledger.transition(job, FAILED, expect=ACTIVE, reason=reason)
    return job


def test_command_notifier_gets_one_argument_per_placeholder_and_no_shell(tmp_path: Path) -> None:
    argv = render_command("notify-me --job={job} '{status}: {reason}' {name}{{x}}",
                          {"job": 7, "status": "FAILED", "reason": "it's; rm -rf / $(x)", "name": "n"})
    assert argv == ["notify-me", "--job=7", "FAILED: it's; rm -rf / $(x)", "n{{x}}"]
    (tmp_path / "notifier.py").write_text(NOTIFIER)
    calls = tmp_path / "calls.txt"
    ledger = Ledger()
    reason = "exit 1; `touch pwned` $(touch pwned2)"
    job = _terminal_job(ledger, tmp_path, [{"command": f"{sys.executable} {tmp_path / 'notifier.py'} {calls} "
                                                       "{job} {status} {reason}"}], reason)
    Manager(ledger, fast_config(), backends={}, out=None).cycle()
    assert calls.read_text().splitlines() == [f"{job}\tFAILED\t{reason}"]
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_failing_notifier_is_retried_bounded_and_never_fails_the_job(tmp_path: Path) -> None:
    ledger = Ledger()
    attempts = tmp_path / "attempts"
    script = tmp_path / "fail.py"
    script.write_text(f"import sys\nopen({str(attempts)!r}, 'a').write('x')\nprint('boom', file=sys.stderr)\n"
                      "sys.exit(3)\n")
    job = _terminal_job(ledger, tmp_path, [{"command": f"{sys.executable} {script}"}], "exit 1")
    manager = Manager(ledger, fast_config(notify_tries=3), backends={}, out=None)
    for _ in range(6):
        manager.cycle()
    [note] = ledger.notes(job)
    assert note["state"] == "FAILED" and note["tries"] == 3 and "exited 3" in note["last_error"]
    assert "boom" in note["last_error"]
    assert attempts.read_text() == "xxx" and ledger.get(job).status == FAILED


def test_email_notifier_speaks_smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[bytes] = []
    srv = socket.create_server(("127.0.0.1", 0))

    def fake_smtp() -> None:
        """A FAKE SMTP server (no real mail server here): just enough of RFC 5321 for smtplib."""
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        conn.sendall(b"220 fake ESMTP\r\n")
        while line := f.readline():
            cmd = line.strip().upper()
            if cmd == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                body = b""
                while (chunk := f.readline()) != b".\r\n":
                    body += chunk
                got.append(body)
                conn.sendall(b"250 queued\r\n")
            elif cmd == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                break
            else:
                conn.sendall(b"250 ok\r\n")
        conn.close()

    thread = threading.Thread(target=fake_smtp, daemon=True)
    thread.start()
    monkeypatch.setenv("FLEETMPI_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("FLEETMPI_SMTP_PORT", str(srv.getsockname()[1]))
    monkeypatch.setenv("FLEETMPI_SMTP_FROM", "fleet@example.org")
    ledger = Ledger()
    job = _terminal_job(ledger, tmp_path, [{"email": "me@example.org"}], "exit 2 (bad input)")
    Manager(ledger, fast_config(), backends={}, out=None).cycle()
    thread.join(10)
    srv.close()
    assert len(got) == 1 and [n["state"] for n in ledger.notes(job)] == ["SENT"]
    text = got[0].decode()
    assert "To: me@example.org" in text and "From: fleet@example.org" in text
    assert f"Subject: fleetmpi job {job} (n): FAILED" in text and "exit 2 (bad input)" in text


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_jobs_through_the_manager_with_one_squeue_per_cycle(tmp_path: Path, datasets: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmpi.jobs.backends import SlurmJobs
    from fleetmpi.launch.slurm import cmd as slurm_cmd
    commands: list[str] = []
    real_run = slurm_cmd.run_slurm

    def counting_run(cmd: Sequence[str], **kw: Any) -> str:  # a spy: the real command runs
        commands.append(cmd[0])
        return real_run(cmd, **kw)

    monkeypatch.setattr(slurm_cmd, "run_slurm", counting_run)
    base = {"model": {"kind": "linear"}, "optimizer": {"lr": 0.05, "batch": 50}, "scheduler": {"backend": "slurm"},
            "goal": {"max_steps": 12}}
    one = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 1, "partition": "cpu"}}}
    wide = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 1, "partition": "cpu"},
                                       "two": {"nodes": 2, "ranks_per_node": 1, "partition": "cpu"}},
            "rules": [{"in": "one", "when": "step >= 6", "then": {"goto": "two"}}]}
    ledger = Ledger()
    ids = [submit(tiny(tmp_path, datasets["regression"], name=f"s{i}", fleet=fleet, **base), ledger=ledger).id
           for i, fleet in enumerate((one, one, wide))]
    spy = PollSpy(SlurmJobs(), inner=lambda: commands.count("squeue"))
    manager = Manager(ledger, fast_config(max_running=3), backends={"slurm": spy}, out=None)
    deadline = time.monotonic() + 240
    while not ledger.idle():
        assert time.monotonic() < deadline
        before = len(spy.polls)
        manager.cycle()
        assert len(spy.polls) - before <= 1
        time.sleep(0.2)
    assert spy.polls and max(spy.inner_calls) == 1 and max(spy.polls) >= 2  # one squeue for several jobs
    assert sorted(spy.launches) == ids
    for job_id in ids:
        job = ledger.get(job_id)
        assert job.status == COMPLETED and job.attempts == 1, job.last_error
        assert len(ledger.allocations(job_id)) == 1
    wide_job = ledger.get(ids[2])
    assert (wide_job.phase, wide_job.shape) == ("two", "2x1@cpu")
    chain = [json.loads(x) for x in (Path(wide_job.job_dir) / "slurm" / "chain.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in chain if r["kind"] == "submit"] == ["one", "two"]
