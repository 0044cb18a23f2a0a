"""Pre-started phases (local rescale overlap): same results, no early reads or writes, no orphans."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import MPIEXEC, ROOT, cli, events, metrics, model_params, write_spec

from fleetmpi.engine.standby import STANDBY_ENV, write_handover
from fleetmpi.jobdir import JobDir
from fleetmpi.jobs.summary import local_chain

pytestmark = pytest.mark.slow

FLEET = {"start": "a", "phases": {"a": {"ranks_per_node": 2}, "b": {"ranks_per_node": 3},
                                  "c": {"ranks_per_node": 1}},
         "rules": [{"in": "a", "when": "step >= 40", "then": {"goto": "b"}},
                   {"in": "b", "when": "step >= 80", "then": {"goto": "c"}}]}


def _spec(tmp_path: Path, data: Path, **over: object) -> Path:
    sections = dict(optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9, "batch": 47}, goal={"max_steps": 120},
                    checkpoint={"every_steps": 20, "keep": 3}, fleet=FLEET)
    return write_spec(tmp_path / "spec.yaml", data, **{**sections, **over})


def _job_processes(job: Path) -> list[psutil.Process]:
    """Return live processes whose command line names ``job`` (mpiexec, ranks, a driver)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(job) in a for a in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_prestarted_phases_give_bitwise_the_run_of_fresh_launches(tmp_path: Path, datasets: dict) -> None:
    spec = _spec(tmp_path, datasets["multiclass"])
    jobs = {}
    for mode in ("next", "off"):
        jobs[mode] = tmp_path / mode
        proc = cli("run", str(spec), "--job-dir", str(jobs[mode]), env={"FLEETMPI_PRESTART": mode})
        assert proc.returncode == 0, proc.stderr
    ev = events(jobs["next"])
    assert [e["phase"] for e in ev if e["event"] == "handover"] == ["b", "c"]
    assert "handover" not in [e["event"] for e in events(jobs["off"])]
    # Each pre-started phase was started before the phase it follows ended, and heard its go
    # only after the launcher recorded that phase's exit.
    for target, before in (("b", "a"), ("c", "b")):
        pre = next(i for i, e in enumerate(ev) if e["event"] == "prestart" and e["phase"] == target)
        exit_ = next(i for i, e in enumerate(ev) if e["event"] == "phase_exit" and e["phase"] == before)
        start = next(e for e in ev if e["event"] == "phase_start" and e["phase"] == target)
        assert pre < exit_
        assert start["startup"]["go"] >= ev[exit_]["t"]
    starts = [(e["phase"], e["ranks"], e["step"]) for e in ev if e["event"] == "phase_start"]
    assert starts == [("a", 2, 0), ("b", 3, 40), ("c", 1, 80)]
    assert starts == [(e["phase"], e["ranks"], e["step"]) for e in events(jobs["off"]) if e["event"] == "phase_start"]
    # Bit for bit: the parameters and every logged loss.
    np.testing.assert_array_equal(model_params(jobs["next"]), model_params(jobs["off"]))
    losses = {m: [(r["step"], r["loss"]) for r in metrics(jobs[m]) if not r.get("eval")] for m in jobs}
    assert losses["next"] == losses["off"] and len(losses["next"]) == 120
    # The chain names each phase once, a pre-started one from its handover; the word file is gone.
    assert [(r["phase"], r["exit_code"]) for r in local_chain(JobDir(jobs["next"]))] == \
        [("a", 3), ("b", 3), ("c", 0)]
    assert not (jobs["next"] / "standby.json").exists()


def _ranks_idle(mpiexec: subprocess.Popen, n: int, timeout: float = 120.0) -> list[psutil.Process]:
    """Wait until ``n`` ranks under ``mpiexec`` use (almost) no CPU for two seconds running: they wait."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        assert mpiexec.poll() is None, "the pre-started phase ended before its word"
        ranks = [k for k in psutil.Process(mpiexec.pid).children(recursive=True)
                 if k.cmdline()[1:3] == ["-m", "fleetmpi.engine.worker"]]
        if len(ranks) == n:
            before = [sum(r.cpu_times()[:2]) for r in ranks]
            time.sleep(1.0)
            used = max(sum(r.cpu_times()[:2]) - b for r, b in zip(ranks, before))
            quiet = quiet + 1 if used < 0.05 else 0
            if quiet >= 2:
                return ranks
        else:
            time.sleep(0.2)
    raise AssertionError(f"the pre-started ranks did not settle into waiting within {timeout} s")


def _snapshot(job: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(job)): (p.stat().st_size, p.stat().st_mtime_ns) for p in job.rglob("*") if p.is_file()}


def test_prestarted_phase_reads_the_checkpoint_only_after_its_word_and_writes_nothing_before(
        tmp_path: Path, datasets: dict) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 60},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    job = tmp_path / "job"
    assert cli("run", str(spec), "--job-dir", str(job)).returncode == 0
    ckpt = job / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step-*.h5")) == ["step-00000020.h5", "step-00000040.h5",
                                                              "step-00000060.h5"]
    (ckpt / "step-00000060.h5").unlink()
    later = tmp_path / "step-00000040.h5"
    shutil.move(ckpt / "step-00000040.h5", later)   # the old phase "is still writing" this one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEETMPI_PROGRESS": "none", "NUMBA_NUM_THREADS": "1",
           STANDBY_ENV: "tok1:two"}
    env.pop("FLEETMPI_DRIVER_PID", None)
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-m", "fleetmpi.engine.worker", str(job)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before = _snapshot(job)
        _ranks_idle(proc, 2)
        write_handover(job, "tok0", True, "a word for another standby")   # not this one's token
        time.sleep(0.5)
        assert proc.poll() is None
        # The checkpoint lands (atomic rename, as checkpoint.save does) while the ranks wait.
        tmp = ckpt / ".step-00000040.h5.tmp.1"
        shutil.copyfile(later, tmp)
        os.replace(tmp, ckpt / "step-00000040.h5")
        after = _snapshot(job)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert changed == {"ckpt/step-00000040.h5", "standby.json"}, changed
        write_handover(job, "tok1", True, "go")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    resume = [e for e in events(job) if e["event"] == "resume"][-1]
    assert resume["step"] == 40 and resume["checkpoint"].endswith("step-00000040.h5")


def test_prestarted_phase_called_off_leaves_nothing_running_and_writes_nothing(
        tmp_path: Path, datasets: dict) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 60},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    job = tmp_path / "job"
    assert cli("run", str(spec), "--job-dir", str(job)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEETMPI_PROGRESS": "none", STANDBY_ENV: "tok2:two"}
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-m", "fleetmpi.engine.worker", str(job)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    before = _snapshot(job)
    _ranks_idle(proc, 2)
    write_handover(job, "tok2", False, "the old phase failed")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert {k for k, v in _snapshot(job).items() if before.get(k) != v} == {"standby.json"}


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_failing_old_phase_calls_off_the_prestarted_one_without_orphans(tmp_path: Path, datasets: dict,
                                                                        ranks: int) -> None:
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": ranks}, "b": {"ranks_per_node": 2}},
             "rules": [{"in": "a", "when": "step >= 100000", "then": {"goto": "b"}}]}
    spec = _spec(tmp_path, datasets["multiclass"], fleet=fleet, goal={"max_steps": 200000},
                 monitor={"log_every_steps": 100, "eval_every_steps": 100})
    job = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "run", str(spec), "--job-dir", str(job)],
                            env={**os.environ, "FLEETMPI_PROGRESS": "none",
                                 "FLEETMPI_TEST_FAULT": f"{ranks - 1}:3000"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    assert f"rank {ranks - 1}/{ranks}@" in err and "injected fault at step 3000" in err, err
    ev = events(job)
    assert [e["phase"] for e in ev if e["event"] == "prestart"] == ["b"]
    off = [e for e in ev if e["event"] == "prestart_called_off"]
    assert [e["phase"] for e in off] == ["b"], off
    assert [e["phase"] for e in ev if e["event"] == "phase_start"] == ["a"]
    assert json.loads((job / "state.json").read_text())["status"] == "FAILED"
    time.sleep(0.5)
    assert _job_processes(job) == []


def test_prestarted_phase_failing_before_its_word_records_nothing_in_the_job(tmp_path: Path,
                                                                             datasets: dict) -> None:
    data = tmp_path / "data"
    shutil.copytree(datasets["multiclass"], data)
    spec = write_spec(tmp_path / "s.yaml", data, goal={"max_steps": 20},
                      fleet={"start": "two", "phases": {"two": {"ranks_per_node": 2}}})
    job = tmp_path / "job"
    assert cli("run", str(spec), "--job-dir", str(job)).returncode == 0
    (data / "train.h5").unlink()   # its data open fails while the old phase would still run
    before = _snapshot(job)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEETMPI_PROGRESS": "none", STANDBY_ENV: "tok3:two"}
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "fleetmpi.engine.worker", str(job)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.h5" in proc.stderr
    assert _snapshot(job) == before
