"""A user's day, part 2 (issue 16, points 7-9): --version, pipes into head, sbatch shortcuts, Slurm times, set-up weight."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli, write_spec

from fleetmpi import spec as specmod
from fleetmpi.cli import build_parser
from fleetmpi.jobdir import JobDir


def _help(*argv: str) -> str:
    parser, _ = build_parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args([*argv, "--help"])
    return " ".join(out.getvalue().split())


def test_version_is_the_package_version() -> None:
    proc = cli("--version", check=True)
    declared = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text())
    assert declared is not None
    assert proc.stdout.strip() == f"fleetmpi {declared.group(1)}"


def _job_with_many_events(tmp_path: Path, datasets: dict[str, Path], n: int) -> Path:
    spec = specmod.load(write_spec(tmp_path / "s.yaml", datasets["multiclass"]))
    jd = JobDir(tmp_path / "job")
    jd.create(specmod.dump(spec), spec.fleet.start, "local")
    # Far more than a pipe buffer holds, so the writer is still writing when head exits.
    lines = [json.dumps({"t": 1.0 + i, "event": "note", "host": "h", "i": i, "pad": "x" * 64}) for i in range(n)]
    with open(jd.events, "a") as f:
        f.write("\n".join(lines) + "\n")
    return jd.root


@pytest.mark.parametrize("argv", [("events", "--json"), ("events",)])
def test_piped_into_head_ends_quietly(tmp_path: Path, datasets: dict[str, Path], argv: tuple[str, ...]) -> None:
    job = _job_with_many_events(tmp_path, datasets, 20000)
    cmd = f"{sys.executable} -m fleetmpi.cli {' '.join(argv)} {job} | head -3"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLEETMPI_PROGRESS": "none"})
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 3
    assert proc.stderr == "", proc.stderr
    if argv == ("events", "--json"):
        assert [json.loads(line)["event"] for line in proc.stdout.splitlines()][-1] in ("note", "created")


@pytest.mark.parametrize(("given", "minutes"), [
    (90, 90), ("90", 90), ("01:00:00", 60), ("1-00:00", 1440), ("1-0", 1440), ("2:30", 3), ("0:59", 1),
    ("1-02:03:04", 1564), ("2-12", 3600)])
def test_time_min_takes_slurm_formats(tmp_path: Path, datasets: dict[str, Path], given: object,
                                      minutes: int) -> None:
    fleet = {"start": "one", "phases": {"one": {"ranks_per_node": 1, "time_min": given}}}
    spec = specmod.load(write_spec(tmp_path / "s.yaml", datasets["multiclass"], fleet=fleet))
    assert spec.phase("one").time_min == minutes
    # The job's spec.yaml stores minutes, and reads back as the same spec.
    again = yaml.safe_load(specmod.dump(spec))["fleet"]["phases"]["one"]["time_min"]
    assert again == minutes


@pytest.mark.parametrize("given", ["1:2:3:4", "1h", "-5", "1-", "0:00", "400-00:00", ""])
def test_time_min_refuses_other_text_naming_the_formats(tmp_path: Path, datasets: dict[str, Path],
                                                         given: str) -> None:
    fleet = {"start": "one", "phases": {"one": {"ranks_per_node": 1, "time_min": given}}}
    path = write_spec(tmp_path / "s.yaml", datasets["multiclass"], fleet=fleet)
    proc = cli("run", str(path), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 2, proc.stderr
    assert "fleet.phases.one.time_min" in proc.stderr and "Traceback" not in proc.stderr
    assert "HH:MM:SS" in proc.stderr or "<= 525600" in proc.stderr


def test_submit_takes_sbatch_shortcuts_for_phases_without_their_own(tmp_path: Path,
                                                                     datasets: dict[str, Path]) -> None:
    from fleetmpi.cli.slurm import sbatch_shortcuts
    fleet = {"start": "a", "phases": {"a": {"ranks_per_node": 1},
                                      "b": {"ranks_per_node": 2, "partition": "gpu", "time_min": 30}},
             "rules": [{"in": "a", "when": "step >= 5", "then": {"goto": "b"}}]}
    path = write_spec(tmp_path / "s.yaml", datasets["multiclass"], fleet=fleet)
    parser, _ = build_parser()
    args = parser.parse_args(["submit", str(path), "-p", "cpu", "-A", "proj", "-t", "1:30", "-q", "high"])
    spec = specmod.load(path, [*args.overrides, *sbatch_shortcuts(args, path)])
    a, b = spec.phase("a"), spec.phase("b")
    assert (a.partition, a.time_min) == ("cpu", 2)          # 1:30 is Slurm's M:S, rounded up as sbatch does
    assert (b.partition, b.time_min) == ("gpu", 30)         # the phase's own values win
    assert (spec.scheduler.account, spec.scheduler.qos) == ("proj", "high")
    long = parser.parse_args(["submit", str(path), "--partition", "cpu", "--time", "01:00:00"])
    assert specmod.load(path, sbatch_shortcuts(long, path)).phase("a").time_min == 60


def test_submit_refuses_a_bad_time_shortcut_in_one_line(tmp_path: Path, datasets: dict[str, Path]) -> None:
    path = write_spec(tmp_path / "s.yaml", datasets["multiclass"], scheduler={"backend": "slurm"})
    proc = cli("submit", str(path), "-t", "soon", "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("fleetmpi: error: submit -t/--time 'soon':") and "HH:MM:SS" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "job").exists()


def test_help_texts_say_what_is_written() -> None:
    for cmd in ("run", "submit"):
        assert "./runs/NAME" in _help(cmd)
    text = _help("predict")
    # predict --help names every dataset predict_file and forecast_file write.
    src = (ROOT / "fleetmpi" / "engine" / "predict.py").read_text()
    written = set(re.findall(r'arrays\["(\w+)"\]', src)) | set(re.findall(r'write_h5_atomic\(out, \{"(\w+)"', src))
    assert written >= {"pred", "proba", "mean", "std", "forecast"}
    for name in written:
        assert re.search(rf"\b{name}\b", text), (name, text)


def test_readme_lists_every_command_that_takes_json() -> None:
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    takes = sorted(name for name, p in sub.choices.items()
                   if any("--json" in a.option_strings for a in p._actions))
    assert takes and "events" in takes
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "`--json` on" in ln)
    listed = sorted(re.findall(r"`([a-z-]+)`", line.split("`--json` on", 1)[1]))
    assert listed == takes, (listed, takes)


def test_report_without_matplotlib_says_how_to_install(tmp_path: Path, datasets: dict[str, Path]) -> None:
    job = _job_with_many_events(tmp_path, datasets, 1)
    # A fake for an absence: matplotlib is installed here, so the import is made to fail.
    code = ("import sys; sys.modules['matplotlib'] = None; from fleetmpi.cli import main; "
            f"sys.exit(main(['report', {str(job)!r}, '--out', {str(tmp_path / 'r.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pip install 'fleetmpi[plot]'" in proc.stderr and "Traceback" not in proc.stderr


def test_device_messages_never_advise_the_setting_in_use() -> None:
    from fleetmpi.engine.device import gpu_model_refusal
    for setting in ("gpu", "auto"):
        for kinds in (("gbdt", "dense"), ("softmax", "sparse"), ("custom", "dense")):
            why = gpu_model_refusal(*kinds, setting=setting)
            assert why is not None
            assert f"use device: {setting}" not in why and not re.search(rf"device: \w+ or {setting}\b", why), why
    assert "use device: cpu or auto" in (gpu_model_refusal("gbdt", "dense", "gpu") or "")


def _make_dry_run(target: str, tmp_path: Path) -> str:
    venv = tmp_path / "fresh-venv"     # missing: make prints what a fresh machine would install
    proc = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_demo_installs_no_gpu_compiler_wheels(tmp_path: Path) -> None:
    demo = _make_dry_run("demo", tmp_path)
    installs = [ln for ln in demo.splitlines() if "pip install" in ln and "-e" in ln]
    assert installs and all("gpu-compile" not in ln and "dev" not in ln for ln in installs), installs
    for target in ("test", "lint"):
        assert "[mpich,dev,gpu-compile]" in _make_dry_run(target, tmp_path)


def test_a_read_only_job_dir_is_one_line_not_a_traceback(tmp_path: Path, datasets: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The OSError a read-only mount gives (EROFS, not a PermissionError) names the path, exit 2."""
    import errno

    from fleetmpi.cli import main

    def read_only(self: JobDir, *args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self.root / "ckpt"))

    monkeypatch.setattr(JobDir, "create", read_only)
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"])
    assert main(["run", str(spec), "--job-dir", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0] and str(tmp_path / "job" / "ckpt") in err[0], err
    assert "Traceback" not in "".join(err)
