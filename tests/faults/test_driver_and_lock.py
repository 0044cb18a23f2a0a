"""Faults of the driver and of the job dir's one-writer rule (issue 11, points 1 and 9).

kill -9 of ``fleetmpi run`` at random moments must leave no mpiexec, proxy or rank behind
and a job dir that resumes to its goal; a second ``fleetmpi run`` on a busy job dir is
refused and writes nothing; a lock whose holder was killed is taken over with an event; a
kill -9 during a checkpoint write leaves a temp that the next start removes; a start over
nothing but corrupt checkpoints says so; SIGUSR2 and SIGINT are reported by name.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from campaign import Campaign, trials
from conftest import ROOT, cli, events, start_cli, wait_for_event, wait_for_training_moment, write_spec

from fleetmpi import spec as specmod
from fleetmpi.jobdir import JobDir, read_lines
from fleetmpi.lock import JobDirBusy, JobLock

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LONG = {"max_steps": 200000}   # far beyond any trial: the run is killed or signalled first


def _job_processes(job: Path) -> list[psutil.Process]:
    """Return the live (not zombie) processes whose command line names ``job``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(job) in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def _gone(pids: list[psutil.Process], job: Path, deadline_s: float) -> bool:
    end = time.time() + deadline_s
    while time.time() < end:
        alive = [p for p in pids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not _job_processes(job):
            return True
        time.sleep(0.1)
    return False


def _spec(tmp_path: Path, datasets: dict, ranks: int, **over: object) -> Path:
    sections: dict = {"model": {"kind": "logistic"}, "goal": LONG,
                      "checkpoint": {"every_steps": 500, "keep": 2},
                      "monitor": {"log_every_steps": 50, "eval_every_steps": 50},
                      "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}}
    sections.update(over)
    return write_spec(tmp_path / "s.yaml", datasets["binary"], **sections)


def _stop_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("trial", range(trials(ci=2, full=13)))
def test_kill9_of_driver_leaves_no_ranks_and_the_job_resumes(tmp_path: Path, datasets: dict, campaign: Campaign,
                                                             trial: int) -> None:
    rng = random.Random(trial)
    ranks = (2, 3, 1)[trial % 3]
    # Ranks left running either outlive the deadline or reach the goal (and write the model)
    # before it: both fail.
    # Every fourth trial kills during start-up, up to 1.5 s after the launch: 30000 steps outlast
    # that on an idle machine (6000 did not at 1 rank). The others kill by step 1000 of 12000.
    at_launch = trial % 4 == 3
    steps = 30000 if at_launch else 12000
    spec = _spec(tmp_path, datasets, ranks, goal={"max_steps": steps}, checkpoint={"every_steps": 1000, "keep": 2})
    job = tmp_path / "job"
    driver = start_cli("run", str(spec), "--job-dir", str(job))
    if at_launch:
        wait_for_event(job, timeout=120.0, kind="launch")
        time.sleep(rng.uniform(0.0, 1.5))
    else:
        wait_for_training_moment(job, rng, proc=driver)
    training = any(e["event"] == "first_step" for e in events(job))
    tree = psutil.Process(driver.pid).children(recursive=True)
    killed_at = time.time()
    driver.kill()
    driver.communicate()
    gone = _gone(tree, job, deadline_s=60.0)
    # Ranks that were training have their handlers: they must checkpoint on the way out.
    checkpointed = not training or any(e["event"] == "signal" for e in events(job))
    left = [" ".join(p.cmdline()) for p in _job_processes(job)]
    _stop_all(_job_processes(job), signal.SIGKILL)
    # Ranks that trained on to the goal without a driver (a goal before the kill is no orphan).
    orphan_goal = any(e["event"] == "goal" and e["t"] > killed_at for e in events(job))
    again = cli("run", str(job), timeout=300)
    ok = gone and not orphan_goal and checkpointed and again.returncode == 0
    campaign.record("kill -9 of the driver (fleetmpi run)", ok=ok, hang=not gone)
    assert gone, f"processes of {job} still running 60 s after the driver was killed: {left}"
    assert not orphan_goal, "the ranks trained on to the goal after their driver was killed"
    assert checkpointed, "the ranks ended without a checkpoint when their driver was killed"
    assert again.returncode == 0, again.stderr
    assert [e for e in events(job) if e["event"] == "goal"][-1]["step"] == steps
    assert not (job / "lock.holder").exists()


def test_second_run_is_refused_while_one_runs_and_writes_nothing(tmp_path: Path, datasets: dict,
                                                                 campaign: Campaign) -> None:
    spec = _spec(tmp_path, datasets, 2)
    job = tmp_path / "job"
    first = start_cli("run", str(spec), "--job-dir", str(job))
    tree: list[psutil.Process] = []
    try:
        wait_for_event(job, timeout=120.0, kind="first_step")
        # Freeze the first run's ranks (its only writers while a phase runs) so that what the
        # second run writes, nothing, can be counted. (Hydra's proxy stays stopped if stopped.)
        tree = [p for p in psutil.Process(first.pid).children(recursive=True)
                if "fleetmpi.engine.worker" in p.cmdline()]
        _stop_all(tree, signal.SIGSTOP)
        time.sleep(0.5)   # a write in flight lands before the count
        before = (len(list(read_lines(job / "metrics.jsonl"))), (job / "state.json").read_bytes(),
                  sorted(os.listdir(job / "ckpt")))
        second = cli("run", str(job), timeout=120)
        after = (len(list(read_lines(job / "metrics.jsonl"))), (job / "state.json").read_bytes(),
                 sorted(os.listdir(job / "ckpt")))
    finally:
        _stop_all(tree, signal.SIGCONT)
        time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    lines = second.stderr.strip().splitlines()
    ok = second.returncode == 2 and after == before and len(lines) == 1
    campaign.record("second fleetmpi run on a busy job dir", ok=ok)
    assert second.returncode == 2, second.stderr
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{job} is in use by pid {first.pid} on {socket.gethostname()} (fleetmpi run, since " in lines[0]
    assert after == before
    assert first.returncode == 4   # the first run was not disturbed: it stopped on our SIGTERM
    assert not (job / "lock.holder").exists()


_HOLDER = """
import sys, time
from fleetmpi.jobdir import JobDir, read_lines
from fleetmpi.lock import JobLock
JobLock(JobDir(sys.argv[1]), "fleetmpi run").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _new_job(tmp_path: Path, spec: Path) -> Path:
    job = tmp_path / "job"
    sp = specmod.load(spec)
    JobDir(job).create(specmod.dump(sp), sp.fleet.start, "local")
    return job


def _hold(job: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(job)], text=True, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None
    line = holder.stdout.readline()
    holder.stdout.close()   # it prints nothing more
    assert line == "held\n"
    return holder


def test_lock_of_a_killed_holder_is_taken_over_with_an_event(tmp_path: Path, datasets: dict,
                                                             campaign: Campaign) -> None:
    job = _new_job(tmp_path, _spec(tmp_path, datasets, 2, goal={"max_steps": 40}))
    holder = _hold(job)
    holder.kill()
    holder.wait()
    proc = cli("run", str(job), timeout=120)
    taken = [e for e in events(job) if e["event"] == "lock_taken_over"]
    ok = proc.returncode == 0 and len(taken) == 1
    campaign.record("stale lock (holder killed)", ok=ok)
    assert proc.returncode == 0, proc.stderr
    assert len(taken) == 1 and taken[0]["old_holder"]["pid"] == holder.pid
    assert taken[0]["old_holder"]["host"] == socket.gethostname()
    assert not (job / "lock.holder").exists()


def test_lock_held_on_another_host_is_refused_naming_host_and_how_to_break_it(tmp_path: Path,
                                                                               datasets: dict) -> None:
    job = _new_job(tmp_path, _spec(tmp_path, datasets, 1))
    holder = _hold(job)
    try:
        # What a holder on another node of a shared file system looks like from here.
        record = json.loads((job / "lock.holder").read_text())
        (job / "lock.holder").write_text(json.dumps({**record, "host": "node-17", "pid": 4242}))
        with pytest.raises(JobDirBusy) as busy:
            JobLock(JobDir(job), "fleetmpi run").acquire()
        msg = str(busy.value)
        assert f"{job} is in use by pid 4242 on node-17 (fleetmpi run, since " in msg
        assert f"remove {job}/lock and {job}/lock.holder" in msg and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    with JobLock(JobDir(job), "fleetmpi run"):   # the flock died with the holder
        assert json.loads((job / "lock.holder").read_text())["pid"] == os.getpid()
    assert not (job / "lock.holder").exists()


def test_kill9_during_a_checkpoint_write_leaves_a_temp_the_next_start_removes(tmp_path: Path, datasets: dict,
                                                                              campaign: Campaign) -> None:
    # A checkpoint every step keeps rank 0 writing most of the time, so a temp is there to catch.
    # 400 steps as in test_checkpoint_faults.py: the kill comes at the first temp seen, the resume
    # writes a checkpoint every step to the goal (3000 fsynced ones took most of this test's time).
    spec = _spec(tmp_path, datasets, 2, goal={"max_steps": 400}, model={"kind": "mlp", "hidden": [256]},
                 checkpoint={"every_steps": 1, "keep": 1})
    job = tmp_path / "job"
    driver = start_cli("run", str(spec), "--job-dir", str(job))
    wait_for_event(job, timeout=120.0, kind="first_step")
    temp = None
    deadline = time.time() + 60
    while temp is None and time.time() < deadline and driver.poll() is None:
        with os.scandir(job / "ckpt") as entries:
            for entry in entries:
                if entry.name.startswith(".step-") and ".h5.tmp." in entry.name:
                    # Freeze the writer first: a temp seen by scandir may be renamed before a
                    # kill lands (a fast write then leaves nothing behind to test). Stopped,
                    # it cannot rename; if the temp is already gone, let it run and look again.
                    pid = int(entry.name.rsplit(".", 1)[1])
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:   # the writer has already ended
                        break
                    if os.path.exists(entry.path):
                        os.kill(pid, signal.SIGKILL)
                        temp = Path(entry.path)
                    else:
                        os.kill(pid, signal.SIGCONT)
                    break
    _, err = driver.communicate(timeout=60)
    assert temp is not None, "no checkpoint temp file was seen while the run wrote a checkpoint every step"
    left = temp.exists()
    again = cli("run", str(job), timeout=300)
    removed = [e for e in events(job) if e["event"] == "temp_removed"]
    ok = left and again.returncode == 0 and [e["path"] for e in removed] == [str(temp)] and not temp.exists()
    campaign.record("kill -9 of rank 0 during a checkpoint write", ok=ok)
    assert driver.returncode == 1, err
    assert left, f"{temp} vanished by itself"
    assert again.returncode == 0, again.stderr
    assert [e["path"] for e in removed] == [str(temp)] and not temp.exists()
    assert removed[0]["pid"] == int(temp.name.rsplit(".", 1)[1])


def test_start_over_only_corrupt_checkpoints_says_it_restarts_from_step_0(tmp_path: Path, datasets: dict,
                                                                          campaign: Campaign) -> None:
    spec = _spec(tmp_path, datasets, 2, goal={"max_steps": 3000}, checkpoint={"every_steps": 20, "keep": 3})
    job = tmp_path / "job"
    driver = start_cli("run", str(spec), "--job-dir", str(job))
    while len([e for e in (events(job) if (job / "events.jsonl").exists() else [])
               if e["event"] == "checkpoint"]) < 2:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    driver.communicate(timeout=60)
    assert driver.returncode == 4
    ckpts = sorted((job / "ckpt").glob("step-*.h5"))
    assert len(ckpts) >= 2
    for path in ckpts:   # cut each in half, as a disk that lost its tail would
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    again = cli("run", str(job), timeout=300)
    ok = again.returncode == 0 and "training restarts from step 0" in again.stderr
    campaign.record("every checkpoint corrupt at start", ok=ok)
    assert again.returncode == 0, again.stderr
    assert (f"fleetmpi: every checkpoint failed verification ({len(ckpts)} set aside as *.corrupt); "
            "training restarts from step 0") in again.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_the_driver_is_reported_as_what_it_was(tmp_path: Path, datasets: dict, campaign: Campaign,
                                                         sig: signal.Signals) -> None:
    spec = _spec(tmp_path, datasets, 2)
    job = tmp_path / "job"
    driver = start_cli("run", str(spec), "--job-dir", str(job))
    wait_for_event(job, timeout=120.0, kind="first_step")
    driver.send_signal(sig)
    _, err = driver.communicate(timeout=120)
    stopped = [e for e in events(job) if e["event"] == "signal"]
    received = [e for e in events(job) if e["event"] == "driver_signal"]
    ok = (driver.returncode == 4 and f"stopped by {sig.name}" in err and "SIGTERM" not in err
          and [e["signal"] for e in stopped] == [sig.name])
    campaign.record(f"{sig.name} to the driver", ok=ok)
    assert driver.returncode == 4, err
    assert f"fleetmpi: received {sig.name}" in err and f"stopped by {sig.name} at step" in err
    assert "SIGTERM" not in err
    assert [e["signal"] for e in stopped] == [sig.name] and [e["signal"] for e in received] == [sig.name]
    assert json.loads((job / "state.json").read_text())["reason"] == f"stopped by {sig.name}"
