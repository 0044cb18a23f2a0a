"""The CLI's one dispatch: job dir or ledger id decided once, one parser, help free of module paths."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import cli, write_spec

from fleetmpi.cli import build_parser
from fleetmpi.jobdir import JobDir


def _help(*argv: str) -> str:
    parser, _ = build_parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        parser.parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return out.getvalue()


def test_every_help_text_is_free_of_module_paths() -> None:
    _, commands = build_parser()
    assert set(commands) == {"run", "inspect", "predict", "make-data", "approve", "events", "queue", "sweep",
                             "manager", "status", "cancel", "report", "submit", "ledger"}
    for argv in [(), *((name,) for name in commands), ("ledger", "rebuild")]:
        text = _help(*argv)
        assert "usage: fleetmpi" in text
        assert "fleetmpi." not in text and "cli_" not in text, f"fleetmpi {' '.join(argv)} --help:\n{text}"


@pytest.mark.parametrize("name", ["run", "submit", "queue", "sweep"])
def test_set_is_the_same_option_everywhere(name: str) -> None:
    parser, _ = build_parser()
    extra = ["--grid", "seed=1,2"] if name == "sweep" else []
    args = parser.parse_args([name, "spec.yaml", *extra, "--set", "seed=3", "--set", "optimizer.lr=0.1"])
    assert args.overrides == ["seed=3", "optimizer.lr=0.1"]
    assert "KEY.PATH=VALUE" in _help(name)


@pytest.fixture
def queued(tmp_path: Path, datasets: dict[str, Path]) -> tuple[dict[str, str], list[tuple[str, Path]]]:
    """Three NEW ledger jobs (ids and job dirs) queued by the real CLI in a private FLEETMPI_HOME."""
    env = {"FLEETMPI_HOME": str(tmp_path / "home")}
    jobs = []
    for name in ("a", "b", "c"):
        spec = write_spec(tmp_path / f"{name}.yaml", datasets["multiclass"], name=name)
        proc = cli("queue", str(spec), "--job-dir", str(tmp_path / name), "--json", env=env, check=True)
        rec = json.loads(proc.stdout)
        jobs.append((str(rec["id"]), Path(rec["job_dir"])))
    return env, jobs


def test_status_of_a_job_dir_and_of_a_ledger_id(queued: tuple[dict[str, str], list[tuple[str, Path]]]) -> None:
    env, [(job_id, job_dir), *_] = queued
    by_id = json.loads(cli("status", job_id, "--json", env=env, check=True).stdout)
    by_name = json.loads(cli("status", "a", "--json", env=env, check=True).stdout)
    by_dir = json.loads(cli("status", str(job_dir), "--json", env=env, check=True).stdout)
    assert by_id["id"] == by_name["id"] == int(job_id) and by_id["status"] == "NEW" and "allocations" in by_id
    assert "chain" in by_dir and by_dir["status"] == "NEW"  # the job dir's own account
    missing = cli("status", "nosuch", env=env)
    assert missing.returncode == 2 and "no job 'nosuch'" in missing.stderr


def test_events_take_a_job_dir_or_a_ledger_id(queued: tuple[dict[str, str], list[tuple[str, Path]]]) -> None:
    env, [(job_id, job_dir), *_] = queued
    JobDir(job_dir).event("probe", value=0.37)
    by_id = cli("events", job_id, "--json", env=env, check=True).stdout
    by_dir = cli("events", str(job_dir), "--json", env=env, check=True).stdout
    assert by_id == by_dir and any(json.loads(line)["event"] == "probe" for line in by_id.splitlines())


def test_approve_takes_a_job_dir_or_a_ledger_id(queued: tuple[dict[str, str], list[tuple[str, Path]]]) -> None:
    env, [(first, first_dir), (_, second_dir), _] = queued
    for ref, jd in ((first, first_dir), (str(second_dir), second_dir)):
        JobDir(jd).update_state(pending_approval={"id": f"r-{jd.name}", "goto": "wide"})
        proc = cli("approve", ref, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(JobDir(jd).approval.read_text())["id"] == f"r-{jd.name}"


def test_cancel_takes_a_job_dir_or_a_ledger_id(queued: tuple[dict[str, str], list[tuple[str, Path]]],
                                               tmp_path: Path) -> None:
    env, [(first, _), (second, second_dir), (third, _)] = queued
    assert cli("cancel", first, env=env).returncode == 0
    assert cli("cancel", str(second_dir), env=env).returncode == 0
    statuses = {r["id"]: r["status"] for r in json.loads(cli("status", "--json", env=env, check=True).stdout)}
    assert statuses == {int(first): "CANCELLED", int(second): "CANCELLED", int(third): "NEW"}
    (tmp_path / "stray").mkdir()
    stray = cli("cancel", str(tmp_path / "stray"), env=env)
    assert stray.returncode == 2 and "no job in" in stray.stderr and "has this job dir" in stray.stderr
    assert len(stray.stderr.strip().splitlines()) == 1


def test_run_refuses_more_ranks_than_cores_before_making_a_job_dir(tmp_path: Path, datasets: dict[str, Path]) -> None:
    import os
    cores = len(os.sched_getaffinity(0))
    spec = write_spec(tmp_path / "wide.yaml", datasets["multiclass"],
                      fleet={"start": "a", "phases": {"a": {"nodes": 1, "ranks_per_node": cores + 1}}})
    env = {**os.environ, "FLEETMPI_OVERSUBSCRIBE": "0"}
    p = cli("run", str(spec), "--job-dir", str(tmp_path / "job"), env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{cores + 1} ranks" in lines[0] and "oversubscribe" in lines[0], p.stderr
    assert not (tmp_path / "job").exists()
    ok = cli("run", str(spec), "--job-dir", str(tmp_path / "job"), "--set", "goal.max_steps=2",
             env={**os.environ, "FLEETMPI_OVERSUBSCRIBE": "1"})
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_refused_spec_exits_before_numpy_and_h5py_load(tmp_path: Path) -> None:
    # Refusals are most CLI calls of the test suite and of a user's typo loop: each loaded
    # numpy and h5py (about half the call's time) before the spec was read.
    import subprocess
    import sys

    from fleetmpi.cli import train
    from fleetmpi.preprocess import AUTO_MAX_CLASSES
    assert train.AUTO_MAX_CLASSES == AUTO_MAX_CLASSES   # make-data's help quotes preprocess's limit
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nbogus: 1\n")
    probe = ("import runpy, sys\nsys.argv = ['fleetmpi', 'run', sys.argv[1]]\n"
             "try:\n    runpy.run_module('fleetmpi.cli', run_name='__main__')\nexcept SystemExit as e:\n"
             "    print(e.code, sorted(m for m in ('numpy', 'h5py') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert "bogus: unknown key" in proc.stderr


def test_python_dash_m_fleetmpi_is_the_fleetmpi_command(tmp_path: Path) -> None:
    # Workflow engines and `srun python -m ...` lines call the package, not the console script.
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nbogus: 1\n")
    ver = subprocess.run([sys.executable, "-m", "fleetmpi", "--version"], capture_output=True, text=True, timeout=60)
    assert ver.returncode == 0 and ver.stdout.startswith("fleetmpi "), (ver.stdout, ver.stderr)
    proc = subprocess.run([sys.executable, "-m", "fleetmpi", "run", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "bogus: unknown key" in proc.stderr, (proc.returncode, proc.stderr)
