"""Slurm backend against the real minicluster: chains of batch jobs, signals, sbatch faults, status.

Tests marked ``slurm`` need the cluster (tests/slurm/slurm_fixtures.py brings it up, or skips;
with CI=true they fail instead). The sbatch fault injector in tests/slurm/fault_injectors/ is the
only fake: Slurm cannot be made to time out on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import ROOT, cli, events, write_spec
from slurm_fixtures import slurm_cluster, wait_idle  # noqa: F401  (a fixture)

from fleetmpi.h5store import read_h5_verified
from fleetmpi.launch.slurm import cmd as slurm_cmd
from fleetmpi.launch.slurm.cmd import IdleNodes, SlurmCommandError, is_permanent_shape, is_transient, run_slurm
from fleetmpi.launch.slurm.script import BatchCommand, check_options, phase_options, render_sbatch
from fleetmpi.rules import parse_condition
from fleetmpi.spec import from_raw

GOLDEN = Path(__file__).parent / "golden"
INJECTOR = Path(__file__).parent / "fault_injectors" / "sbatch_fault_injector.py"


def _chain(job: Path) -> list[dict[str, Any]]:
    path = job / "slurm" / "chain.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return arrays["params"]


def _wait_for(pred: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _count_events(job: Path, kind: str) -> int:
    try:
        return sum(1 for e in events(job) if e["event"] == kind)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _submitted_ids(job: Path) -> list[str]:
    return [r["job_id"] for r in _chain(job) if r["kind"] == "submit"]


def _jobs_with_key(key: str) -> list[str]:
    out = run_slurm(["squeue", "--noheader", "--states=all", "--format=%i|%k"])
    return [line.split("|")[0] for line in out.splitlines() if line.strip().endswith("|" + key)]


def _one_phase_spec(tmp_path: Path, data: Path, steps: int, name: str = "t", **scheduler: Any) -> Path:
    fleet = {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"}}}
    return write_spec(tmp_path / f"{name}.yaml", data, name=name, fleet=fleet, goal={"max_steps": steps},
                      checkpoint={"every_steps": 1000, "keep": 2},
                      monitor={"log_every_steps": 1, "eval_every_steps": 50},
                      scheduler={"backend": "slurm", "submit_backoff_s": 0.2, **scheduler})


def _injector_env(tmp_path: Path, mode: str) -> tuple[dict[str, str], Path]:
    """Put the sbatch fault injector first on PATH (as `sbatch`); return (env, its call log)."""
    bindir = tmp_path / "fault-bin"
    bindir.mkdir()
    (bindir / "sbatch").symlink_to(INJECTOR)
    log = tmp_path / "sbatch-calls.jsonl"
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FLEETMPI_FAULT_SBATCH": mode,
            "FLEETMPI_FAULT_SBATCH_LOG": str(log)}, log


def _submissions(log: Path) -> list[dict[str, Any]]:
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["submission"]] if log.exists() else []


# -- the rendered script (no cluster needed) ------------------------------------------------------

_GOLDEN_SPEC = {
    "name": "demo",
    "data": {"train": "/data/train.h5"},
    "model": {"kind": "softmax"},
    "goal": {"max_steps": 10},
    "fleet": {"start": "small", "phases": {
        "small": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"},
        "gpu": {"nodes": 2, "ranks_per_node": 1, "partition": "gpu", "gpus_per_node": 1, "device": "gpu",
                "cpus_per_rank": 4, "time_min": 90, "mem_gb": 3.5}},
        "rules": [{"in": "small", "when": "idle_nodes[gpu] >= 2", "then": {"goto": "gpu"}}]},
}


@pytest.mark.parametrize("case", ["srun-gpu", "mpiexec-cpu"])
def test_rendered_script_matches_golden_file(case: str) -> None:
    raw = json.loads(json.dumps(_GOLDEN_SPEC))
    if case == "srun-gpu":
        raw["scheduler"] = {"backend": "slurm", "account": "proj-a", "qos": "normal", "signal_grace_s": 300,
                            "launcher_args": ["--cpu-bind=none"], "extra_sbatch": ["--constraint=a100", "--exclusive"]}
        phase, launcher, mpiexec = "gpu", "srun", None
    else:
        raw["scheduler"] = {"backend": "slurm", "launcher": "mpiexec", "requeue": True}
        phase, launcher, mpiexec = "small", "mpiexec", "/opt/fleet/venv/bin/mpiexec"
    spec = from_raw(raw, "golden.yaml", Path("/"))
    cmd = BatchCommand(job_dir="/scratch/jobs/demo dir's", python="/opt/fleet/venv/bin/python",
                       pythonpath="/opt/fleet/src", phase=phase, shape=spec.phase(phase).shape(),
                       launcher=launcher, launcher_args=tuple(spec.scheduler.launcher_args), mpiexec=mpiexec,
                       threads=spec.phase(phase).threads)
    text = render_sbatch(cmd, **phase_options(spec, phase, comment="fleetmpi.0123456789ab.2"))
    golden = GOLDEN / f"{case}.sbatch"
    if os.environ.get("FLEETMPI_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered script differs from {golden} (FLEETMPI_UPDATE_GOLDEN=1 rewrites it)"
    check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_render_refuses_values_that_could_inject() -> None:
    cmd = BatchCommand(job_dir="/j", python="/p", pythonpath="/s", phase="a", shape="1x1")
    ok = {"job_name": "demo", "comment": "fleetmpi.x.0"}
    render_sbatch(cmd, **ok)
    bad: list[dict[str, Any]] = [
        {"partition": "cpu;touch PWNED"}, {"account": "$(touch PWNED)"}, {"qos": "a b"},
        {"comment": "x --wrap=touch"}, {"gres": "gpu:1 --wrap"}, {"output": "../escape/%j.out"},
        {"output": "/abs/%j"}, {"nodes": 0}, {"nodes": True}, {"time_min": "10"},
        {"additional": ["--comment=$(touch PWNED)"]}, {"additional": ["--constraint=a b"]},
        {"additional": ["--nodes=9"]}, {"additional": "--exclusive"}, {"signal_grace_s": 5},
    ]
    for extra in bad:
        with pytest.raises(ValueError, match="sbatch option"):
            render_sbatch(cmd, **{**ok, **extra})
    with pytest.raises(TypeError):
        render_sbatch(cmd, **ok, chdir="/tmp")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"unknown sbatch option.*valid: job_name, comment, nodes"):
        check_options({"job_name": "x", "chdir": "/tmp"})


def test_spec_refuses_hostile_name_and_extra_sbatch(tmp_path: Path, datasets: dict) -> None:
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 10)
    for override, key in (("name=x;touch PWNED", "name"),
                          ("scheduler.extra_sbatch=['--comment=$(touch PWNED)']", "scheduler.extra_sbatch[0]"),
                          ("scheduler.extra_sbatch=['--partition=gpu']", "scheduler.extra_sbatch[0]"),
                          ("scheduler.account=a;b", "scheduler.account"),
                          ("scheduler.launcher=ssh", "scheduler.launcher")):
        proc = cli("submit", str(spec), "--job-dir", str(tmp_path / "job"), "--set", override, cwd=tmp_path)
        assert proc.returncode == 2, (override, proc.stderr)
        assert key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "job").exists()
    assert not list(tmp_path.rglob("PWNED"))


def test_error_classes_of_slurm_failures() -> None:
    def err(text: str, code: int | None = 1) -> SlurmCommandError:
        return SlurmCommandError(["sbatch", "x.sbatch"], code, "", text)
    assert is_transient(err("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"))
    assert is_transient(err("sbatch: error: QOSMaxSubmitJobPerUserLimit"))
    assert is_transient(err("", None))  # our own timeout: the command may have acted
    assert not is_transient(err("sbatch: error: invalid partition specified: nope"))
    assert is_permanent_shape(err("allocation failure: Requested node configuration is not available"))
    msg = str(err("boom\nline two"))
    assert "`sbatch x.sbatch` exited 1" in msg and "stdout: ''" in msg and "stderr: 'boom\\nline two'" in msg


# -- against the real cluster -------------------------------------------------------------------

@pytest.mark.slurm
def test_rescale_chain_cpu_wide_gpu_reaches_goal_and_matches_local_run(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    fleet = {"start": "small",
             "phases": {"small": {"nodes": 1, "ranks_per_node": 2, "partition": "cpu"},
                        "wide": {"nodes": 2, "ranks_per_node": 2, "partition": "cpu"},
                        "gpu": {"nodes": 1, "ranks_per_node": 2, "partition": "gpu", "gpus_per_node": 1,
                                "device": "cpu"}},
             "rules": [{"in": "small", "when": "step >= 20", "then": {"goto": "wide"}},
                       {"in": "wide", "when": "step >= 40", "then": {"goto": "gpu"}}]}
    spec = write_spec(tmp_path / "spec.yaml", datasets["multiclass"], fleet=fleet, goal={"max_steps": 60})
    on_slurm, local = tmp_path / "on-slurm", tmp_path / "local"
    proc = cli("submit", str(spec), "--backend", "slurm", "--wait", "--json", "--job-dir", str(on_slurm), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 0 and out["status"] == "COMPLETED", out
    chain = out["chain"]
    assert [(r["phase"], r["shape"], r["by"], r["exit_code"], r["state"]) for r in chain] == [
        ("small", "1x2@cpu", "submit", 3, "EXITED"), ("wide", "2x2@cpu", "rescale", 3, "EXITED"),
        ("gpu", "1x2@gpu+1gpu", "rescale", 0, "EXITED")]
    ids = [r["job_id"] for r in chain]
    assert len(set(ids)) == 3 and json.loads((on_slurm / "state.json").read_text())["backend_ids"] == ids
    # The shapes as each batch job saw them in its own environment.
    seen = [json.loads((on_slurm / "slurm" / f"{i}.0.env.json").read_text()) for i in ids]
    assert [(e["SLURM_JOB_NUM_NODES"], e["SLURM_NTASKS_PER_NODE"], e["SLURM_JOB_PARTITION"]) for e in seen] == [
        ("1", "2", "cpu"), ("2", "2", "cpu"), ("1", "2", "gpu")]
    assert seen[1]["SLURM_JOB_NODELIST"] == "node[1-2]"
    assert seen[2]["SLURM_JOB_GPUS"] == "0" and seen[2]["CUDA_VISIBLE_DEVICES"] == "0"
    assert "SLURM_JOB_GPUS" not in seen[0] and "SLURM_JOB_GPUS" not in seen[1]
    starts = [(e["phase"], e["ranks"], e["step"]) for e in events(on_slurm) if e["event"] == "phase_start"]
    assert starts == [("small", 2, 0), ("wide", 4, 20), ("gpu", 2, 40)]

    proc = cli("run", str(spec), "--job-dir", str(local))
    assert proc.returncode == 0, proc.stderr
    assert [(e["phase"], e["ranks"], e["step"]) for e in events(local) if e["event"] == "phase_start"] == starts
    p_slurm, p_local = _params(on_slurm), _params(local)
    assert np.max(np.abs(p_slurm - p_local)) <= 1e-5
    assert not np.array_equal(p_local, np.zeros_like(p_local))

    status = cli("status", str(on_slurm), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "COMPLETED" and [r["source"] for r in info["chain"]] == ["exit file"] * 3


@pytest.mark.slurm
def test_usr2_to_batch_shell_checkpoints_resubmits_and_resumes_at_that_step(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    # 100000 steps (~6 s at 2 ranks): the job outlives two signals 0.3 s apart, the resubmission finishes.
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 100_000, max_preemptions=1)
    job = tmp_path / "job"
    env = {**os.environ, "FLEETMPI_PROGRESS": "none"}
    proc = subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", "submit", str(spec), "--wait", "--json",
                             "--job-dir", str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for n in (1, 2):
            _wait_for(lambda n=n: _count_events(job, "first_step") >= n, f"step 1 of Slurm job {n}")
            time.sleep(0.3)
            run_slurm(["scancel", "--signal=USR2", "--batch", _submitted_ids(job)[-1]])
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            for jid in _submitted_ids(job):
                subprocess.run(["scancel", jid])
    assert proc.returncode == 4, stderr   # second stop hits max_preemptions=1
    ev = events(job)
    signals = [e for e in ev if e["event"] == "signal"]
    assert [e["signal"] for e in signals] == ["SIGUSR2", "SIGUSR2"]
    stop_step = signals[0]["step"]
    assert stop_step > 1
    ckpts = [e for e in ev if e["event"] == "checkpoint" and e["reason"] == "signal SIGUSR2"]
    assert ckpts[0]["step"] == stop_step
    starts = [e for e in ev if e["event"] == "phase_start"]
    assert [e["step"] for e in starts] == [0, stop_step]
    assert [e["step"] for e in ev if e["event"] == "resume"] == [stop_step]
    runs = json.loads(stdout)["chain"]
    assert [(r["by"], r["exit_code"], r["stop"]) for r in runs] == [("submit", 4, "preemption"),
                                                                     ("preemption", 4, "preemption")]
    state = json.loads((job / "state.json").read_text())
    assert state["status"] == "STOPPED" and state["slurm_preemptions"] == 2 and state.get("slurm_timeouts", 0) == 0
    assert "max_preemptions=1" in state["reason"]

    # A person submits the stopped job again: it resumes from the second stop and finishes.
    proc2 = cli("submit", str(job), "--wait", "--json", timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    runs = json.loads(proc2.stdout)["chain"]
    assert [r["by"] for r in runs] == ["submit", "preemption", "resume"] and runs[-1]["exit_code"] == 0
    starts = [e["step"] for e in events(job) if e["event"] == "phase_start"]
    assert starts == [0, stop_step, signals[1]["step"]]
    assert json.loads((job / "state.json").read_text())["status"] == "COMPLETED"


@pytest.mark.slurm
def test_time_limit_warning_counts_as_timeout_mpiexec_forwards_it(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    # A 1-minute limit with a 50 s warning: Slurm sends USR2 to the batch shell after ~10-30 s.
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 10_000_000, launcher="mpiexec", max_timeouts=0,
                           signal_grace_s=50)
    raw = yaml.safe_load(spec.read_text())
    raw["fleet"]["phases"]["one"]["time_min"] = 1
    spec.write_text(yaml.safe_dump(raw))
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--wait", "--job-dir", str(job), timeout=150)
    assert proc.returncode == 4, proc.stderr
    script = (job / "slurm" / "000-one.sbatch").read_text()
    assert "#SBATCH --time=1" in script and "#SBATCH --signal=B:USR2@50" in script and '"$mpiexec" -n 2' in script
    ev = events(job)
    sig = [e for e in ev if e["event"] == "signal"]
    assert [e["signal"] for e in sig] == ["SIGTERM"]  # the shell forwards TERM to hydra, which passes it on
    assert any(e["event"] == "checkpoint" and e["step"] == sig[0]["step"] for e in ev)
    exits = [r for r in _chain(job) if r["kind"] == "exit"]
    assert [(r["exit_code"], r["signal"], r["stop"]) for r in exits] == [(4, "USR2", "timeout")]
    state = json.loads((job / "state.json").read_text())
    assert state["slurm_timeouts"] == 1 and state.get("slurm_preemptions", 0) == 0 and state["status"] == "STOPPED"
    assert "max_timeouts=0" in state["reason"]


@pytest.mark.slurm
def test_sbatch_timeout_after_the_job_was_created_gives_exactly_one_job(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    env, log = _injector_env(tmp_path, "timeout-after-submit:1")
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 30)
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--wait", "--json", "--job-dir", str(job), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(_submissions(log)) == 1   # the retry found the job instead of submitting again
    subs = [r for r in _chain(job) if r["kind"] == "submit"]
    assert len(subs) == 1 and subs[0]["adopted"] is True
    assert _jobs_with_key(subs[0]["key"]) == [subs[0]["job_id"]]
    retries = [e for e in events(job) if e["event"] == "slurm_retry"]
    assert len(retries) == 1 and "Socket timed out" in retries[0]["error"]
    assert json.loads(proc.stdout)["status"] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.parametrize("mode", ["transient:2", "qos:2"])
def test_transient_sbatch_failures_are_retried(tmp_path: Path, datasets: dict, slurm_cluster: Path,  # noqa: F811
                                               mode: str) -> None:
    env, log = _injector_env(tmp_path, mode)
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 30)
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--wait", "--job-dir", str(job), env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = _submissions(log)
    assert [c["fault"] for c in calls] == [mode.split(":")[0]] * 2 + [None]
    subs = [r for r in _chain(job) if r["kind"] == "submit"]
    assert len(subs) == 1 and subs[0]["adopted"] is False
    assert _jobs_with_key(subs[0]["key"]) == [subs[0]["job_id"]]
    assert sum(1 for e in events(job) if e["event"] == "slurm_retry") == 2


@pytest.mark.slurm
def test_sbatch_failures_that_do_not_pass_fail_clearly(tmp_path: Path, datasets: dict,
                                                       slurm_cluster: Path) -> None:  # noqa: F811
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 30, submit_attempts=3)
    # Transient errors that last: three tries, then an error with command, code and both streams.
    env, log = _injector_env(tmp_path, "transient:99")
    proc = cli("submit", str(spec), "--job-dir", str(tmp_path / "j1"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert len(_submissions(log)) == 3
    for part in ("failed 3 times", "`sbatch --parsable --hold ", "exited 1", "stdout: ''",
                 "Unable to contact slurm controller"):
        assert part in proc.stderr, proc.stderr
    # A shape the cluster does not have, reported at submission: no retry.
    log.unlink()
    env["FLEETMPI_FAULT_SBATCH"] = "permanent"
    proc = cli("submit", str(spec), "--job-dir", str(tmp_path / "j2"), env=env)
    assert proc.returncode == 2 and len(_submissions(log)) == 1, proc.stderr
    assert "phase one (1x2@cpu: 1 node(s) x 2 rank(s) x 1 CPU(s), partition cpu)" in proc.stderr
    # The real thing: an impossible shape is refused by `sbatch --test-only` before the job dir exists.
    raw = yaml.safe_load(spec.read_text())
    raw["fleet"]["phases"]["big"] = {"nodes": 1, "ranks_per_node": 3, "partition": "cpu"}
    raw["fleet"]["rules"] = [{"when": "step >= 5", "then": {"goto": "big"}}]
    spec.write_text(yaml.safe_dump(raw))
    proc = cli("submit", str(spec), "--job-dir", str(tmp_path / "j3"))
    assert proc.returncode == 2, proc.stderr
    assert "phase big (1x3@cpu" in proc.stderr and "Requested node configuration is not available" in proc.stderr
    assert not (tmp_path / "j3").exists()


@pytest.mark.slurm
def test_hostile_job_dir_and_data_paths_run_and_inject_nothing(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    data = tmp_path / "da ta;`touch PWNED`$(touch PWNED)'\""
    shutil.copytree(datasets["multiclass"], data)
    spec = _one_phase_spec(tmp_path, data, 30, name="hostile")
    job = tmp_path / "tmp" / "we ird;$(touch PWNED)'\"dir"
    proc = cli("submit", str(spec), "--wait", "--job-dir", str(job), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (job / "model.h5").is_file()
    script = next((job / "slurm").glob("*.sbatch")).read_text()
    assert "#SBATCH --job-name=hostile" in script and "PWNED" in script  # present, but only inside quotes
    for where in (tmp_path, job, ROOT, Path.cwd(), Path("/tmp"), Path("/"), Path.home()):
        assert not (where / "PWNED").exists(), where
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.slurm
def test_status_reads_exit_file_then_squeue_and_never_invents_completion(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 10_000_000)
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    jid = proc.stdout.strip()
    assert _submitted_ids(job) == [jid]
    _wait_for(lambda: _count_events(job, "first_step") >= 1, "the job's first step")
    info = json.loads(cli("status", str(job), "--json").stdout)
    assert info["chain"][0]["state"] == "RUNNING" and info["chain"][0]["source"] == "squeue"
    again = cli("submit", str(job))   # the same job again while its chain runs: no second job
    assert again.returncode == 0 and "not submitting another" in again.stderr, again.stderr
    assert _submitted_ids(job) == [jid]
    run_slurm(["scancel", jid])   # TERM to the batch shell: the chain ends, it does not resubmit
    _wait_for(lambda: slurm_cmd.squeue_states([jid]).get(jid) == "CANCELLED", "the job to be CANCELLED")
    _wait_for(lambda: any(r["kind"] == "end" for r in _chain(job)), "the chain's end record", 30)
    time.sleep(1)
    assert _submitted_ids(job) == [jid]
    info = json.loads(cli("status", str(job), "--json").stdout)
    assert info["status"] == "CANCELLED" and info["exit_code"] == 4, info

    # A job Slurm has forgotten (older than MinJobAge) and that left no exit file: UNKNOWN.
    ghost = tmp_path / "ghost"
    shutil.copytree(job, ghost)
    lines = [json.loads(line) for line in (ghost / "slurm" / "chain.jsonl").read_text().splitlines()]
    kept = [dict(r, job_id="99999999") for r in lines if r["kind"] in ("submit", "start")]
    (ghost / "slurm" / "chain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for f in (ghost / "slurm").glob("*.exit"):
        f.unlink()
    info = json.loads(cli("status", str(ghost), "--json").stdout)
    assert info["status"] == "UNKNOWN" and info["chain"][0]["state"] == "UNKNOWN", info
    text = cli("status", str(ghost)).stdout
    assert "UNKNOWN" in text and "COMPLETED" not in text


@pytest.mark.slurm
def test_squeue_states_asks_once_for_many_ids(slurm_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    ids = [run_slurm(["sbatch", "--parsable", "--hold", "--output=/dev/null", "--wrap=true"]).strip() for _ in range(3)]
    try:
        calls: list[list[str]] = []
        real = slurm_cmd.run_slurm
        monkeypatch.setattr(slurm_cmd, "run_slurm", lambda cmd, **kw: calls.append(list(cmd)) or real(cmd, **kw))
        states = slurm_cmd.squeue_states([*ids, "99999998"])
        assert states == dict.fromkeys(ids, "PENDING") and len(calls) == 1 and calls[0][0] == "squeue"
        assert slurm_cmd.squeue_states(["99999998"]) == {}   # squeue refuses a lone unknown id
        assert slurm_cmd.squeue_states([]) == {} and len(calls) == 2
    finally:
        subprocess.run(["scancel", *ids])


@pytest.mark.slurm
def test_idle_nodes_per_partition_from_sinfo_at_most_every_30_s(slurm_cluster: Path) -> None:  # noqa: F811
    wait_idle()
    now = [1000.0]
    sampler = IdleNodes(clock=lambda: now[0])
    m = sampler.metrics()
    assert m == {"idle_nodes[cpu]": 2.0, "idle_nodes[gpu]": 2.0, "idle_nodes": 4.0}, sampler.last_error
    assert parse_condition("idle_nodes[cpu] >= 2").holds(m)
    assert not parse_condition("idle_nodes[gpu] >= 3").holds(m)
    now[0] += 29.0
    assert sampler.metrics() == m and sampler.calls == 1
    held = run_slurm(["sbatch", "--parsable", "-p", "cpu", "-N", "1", "--output=/dev/null", "--wrap=sleep 30"]).strip()
    try:
        _wait_for(lambda: slurm_cmd.squeue_states([held]).get(held) == "RUNNING", "a job on one cpu node")
        now[0] += 2.0
        m = sampler.metrics()
        assert sampler.calls == 2 and m["idle_nodes[cpu]"] == 1.0 and m["idle_nodes"] == 3.0
    finally:
        subprocess.run(["scancel", held])


@pytest.mark.slurm
def test_requeue_mode_puts_the_same_job_back_in_the_queue(
        tmp_path: Path, datasets: dict, slurm_cluster: Path) -> None:  # noqa: F811
    spec = _one_phase_spec(tmp_path, datasets["multiclass"], 10_000_000, requeue=True)
    job = tmp_path / "job"
    proc = cli("submit", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    jid = proc.stdout.strip()
    try:
        _wait_for(lambda: _count_events(job, "first_step") >= 1, "the job's first step")
        run_slurm(["scancel", "--signal=USR2", "--batch", jid])
        _wait_for(lambda: any(r["kind"] == "requeue" for r in _chain(job)), "the requeue record")
        # Slurm holds a requeued job back for a while (BeginTime) before it runs again.
        shown = _wait_for(lambda: (lambda t: t if "Restarts=1" in t and "JobState=PENDING" in t else None)(
            run_slurm(["scontrol", "show", "job", jid])), "the job to be pending again", 30)
        assert "Requeue=1" in shown
        info = json.loads(cli("status", str(job), "--json").stdout)
        assert [(r["job_id"], r["restart"], r["by"]) for r in info["chain"]] == [(jid, 0, "submit"), (jid, 1, "preemption")]
        assert info["chain"][0]["exit_code"] == 4 and info["chain"][1]["state"] == "PENDING"
        assert _submitted_ids(job) == [jid]
    finally:
        subprocess.run(["scancel", jid])
