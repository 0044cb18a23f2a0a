"""Shared fixtures: real mpiexec, real HDF5 files, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from campaign import CAMPAIGN, Campaign
from campaign import report as report_campaign

ROOT = Path(__file__).resolve().parent.parent
# Multi-rank tests run 3 ranks on 2-core CI machines; a test of the refusal sets it to 0.
os.environ.setdefault("FLEETMPI_OVERSUBSCRIBE", "1")
# `fleetmpi run` and `submit` record their jobs in the ledger: never in the user's own ~/.fleetmpi.
# The process that makes the directory removes it when it exits (xdist's workers inherit it).
if "FLEETMPI_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["FLEETMPI_HOME"] = tempfile.mkdtemp(prefix="fleetmpi-test-home-")
    atexit.register(shutil.rmtree, os.environ["FLEETMPI_HOME"], ignore_errors=True)
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def cli(*args: str, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `fleetmpi ARGS` as a subprocess (the real CLI, real mpiexec)."""
    full = {**os.environ, "FLEETMPI_PROGRESS": "none", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "fleetmpi.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fleetmpi {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def mpirun(n: int, script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a Python script under real mpiexec with ``n`` ranks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, str(script), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def record_launches(env: dict[str, str], path: Path) -> dict[str, str]:
    """Return ``env`` that makes simulated processes log their kernel launches' types to ``path``."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "tests" / "gpu" / "launch_record"), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": pythonpath, "FLEETMPI_RECORD_LAUNCHES": str(path)}


def assert_launches_compile_checked(path: Path) -> int:
    """Assert every launch logged at ``path`` has its signature in kernels.gpu_compile; return the count.

    The compile check (tests/gpu/test_gpu_compile.py) compiles those signatures for real GPUs:
    a launch with other argument types would be compiled first on a user's GPU.
    """
    from kernels.gpu_compile import signatures
    known = {(kernel.py_func.__name__, ", ".join(str(t) for t in sig)) for kernel, sig in signatures().values()}
    seen = {tuple(line.split("\t")) for line in path.read_text().splitlines()} if path.exists() else set()
    assert seen, f"no kernel launch was recorded in {path}"
    missing = sorted(seen - known)
    assert not missing, "launches whose argument types kernels.gpu_compile.signatures() does not compile:\n" + \
        "\n".join(f"  {name}({types})" for name, types in missing)
    return len(seen)


def events(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def wait_for_event(job: Path, kind: str, timeout: float = 60.0,
                   proc: subprocess.Popen[str] | None = None) -> dict[str, Any]:
    """Return the newest ``kind`` event of ``job`` once it appears; fail after ``timeout`` s or when ``proc`` ends."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if (job / "events.jsonl").exists():
            found = [e for e in events(job) if e["event"] == kind]
            if found:
                return found[-1]
        time.sleep(0.02)
    rc = f" (driver rc {proc.poll()})" if proc is not None else ""
    raise AssertionError(f"no {kind} event in {job} within {timeout} s{rc}")


def wait_for_training_moment(job: Path, rng: Any, proc: subprocess.Popen[str] | None = None,
                             first: int = 250, last: int = 1000, timeout: float = 120.0) -> int:
    """Return at a random step (``first`` to ``last``) of ``job``'s training, read from metrics.jsonl; return it.

    A moment drawn by step, not by time since the first step, lands in training on a machine
    of any speed, so a trial needs only a few thousand steps beyond ``last`` (a second drawn
    by time needed 20000 steps for an idle machine, and minutes of them on a loaded one).
    """
    target = rng.randint(first, last)
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if (job / "metrics.jsonl").exists():
            *done, _partial = (job / "metrics.jsonl").read_bytes().split(b"\n")   # the last may be half written
            if done and json.loads(done[-1]).get("step", 0) >= target:
                return target
        time.sleep(0.01)
    rc = f" (driver rc {proc.poll()})" if proc is not None else ""
    raise AssertionError(f"{job} did not reach step {target} within {timeout} s{rc}")


def model_params(job: Path) -> np.ndarray:
    """Return the ``params`` array of a job's verified model.h5."""
    from fleetmpi.h5store import read_h5_verified
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return arrays["params"]


def start_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``fleetmpi ARGS`` in the background (no progress bar, this checkout first); a fault trial's driver."""
    return subprocess.Popen([sys.executable, "-m", "fleetmpi.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FLEETMPI_PROGRESS": "none", "PYTHONPATH": str(ROOT)})


def uninterrupted_params(base: Path, data: Path, **sections: Any) -> np.ndarray:
    """Return the final parameters of an uninterrupted run of ``sections`` in ``base``: a trial's reference."""
    spec = write_spec(base / "s.yaml", data, **sections)
    cli("run", str(spec), "--job-dir", str(base / "job"), check=True, timeout=300)
    return model_params(base / "job")


def metrics(job: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


# Signals whose disposition code under test may change in this process: batch `continue`
# ignores SIGTERM and SIGUSR2, the worker and the manager install handlers. Left behind, a
# later test's forked children inherit them (a multiprocessing pool's workers that ignore
# SIGTERM never end, and the xdist worker hangs until the timeout: CI saw it).
_GUARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signals_restored() -> Iterator[None]:
    """Give every test the signal dispositions it started with back when it ends."""
    saved = {s: signal.getsignal(s) for s in _GUARDED_SIGNALS}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) is not handler and handler is not None:
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic datasets written by the real `fleetmpi make-data` (seeded, random)."""
    base = tmp_path_factory.mktemp("data")
    out = {}
    for task, extra in (("multiclass", ["--classes", "4"]), ("binary", []), ("regression", [])):
        folder = base / task
        cli("make-data", "--task", task, "--n", "1000", "--d", "12", "--seed", "3", *extra,
            "--out", str(folder), check=True)
        out[task] = folder
    return out


def write_spec(path: Path, data: Path, **sections: Any) -> Path:
    """Write a small valid spec on ``data`` (a make-data folder), sections overriding defaults."""
    spec: dict[str, Any] = {
        "name": "t",
        "seed": 1,
        "data": {"train": str(data / "train.h5"), "valid": str(data / "valid.h5")},
        "model": {"kind": "softmax", "l2": 1e-4},
        "optimizer": {"kind": "sgd", "lr": 0.2, "momentum": 0.9, "batch": 50},
        "goal": {"max_steps": 60},
        "checkpoint": {"every_steps": 20, "keep": 3},
        "monitor": {"log_every_steps": 1, "eval_every_steps": 5},
        "fleet": {"start": "one", "phases": {"one": {"nodes": 1, "ranks_per_node": 1}}},
    }
    spec.update(sections)
    path.write_text(yaml.safe_dump(spec))
    return path


SOLO = {"start": "solo", "phases": {"solo": {"ranks_per_node": 1}}}


def run_rescaled_and_solo(tmp_path: Path, data: Path, fleet: dict[str, Any], **common: Any) -> tuple[Path, Path]:
    """Run one spec through ``fleet``'s rescales and again on one rank; return both job dirs."""
    jobs = []
    for name, fl in (("rescaled", fleet), ("solo", SOLO)):
        spec = write_spec(tmp_path / f"{name}.yaml", data, fleet=fl, **common)
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        jobs.append(tmp_path / name)
    return jobs[0], jobs[1]


def on_the_cluster(nodeid: str) -> bool:
    """Return whether test ``nodeid`` counts as a Slurm test for the scheduling below.

    The rule reads node ids, the one thing pytest-xdist's scheduler sees; every test marked
    ``slurm`` must match it (checked at collection), others that match only share the worker.
    """
    return nodeid.startswith("tests/slurm/") or "::test_slurm_" in nodeid


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a Slurm test the scheduling would miss; put the Slurm tests first."""
    missed = [item.nodeid for item in items if item.get_closest_marker("slurm") and not on_the_cluster(item.nodeid)]
    if missed:
        raise pytest.UsageError(f"tests marked slurm must live in tests/slurm/ or be named test_slurm_*: {missed}")
    # Started first, the longest stretch of waiting on Slurm overlaps the other worker's tests.
    items.sort(key=lambda item: not on_the_cluster(item.nodeid))   # stable: order kept within each part


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `make test` (pytest-xdist, ``-n 2 --dist loadgroup``) run every Slurm test on one worker.

    They share the minicluster's four nodes, wait for it to be idle and count its running
    jobs and squeue calls: a second worker's Slurm jobs would change those counts. (The
    ``xdist_group`` mark would say this, but with pytest 9.2 xdist 3.8 silently ignores it:
    pytest-xdist issue 1386.) Other tests are spread one by one, as loadgroup does.
    """
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlurmOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if on_the_cluster(nodeid) else nodeid

    return SlurmOnOneWorker(config, log)


@pytest.fixture(scope="session")
def campaign() -> Iterator[Campaign]:
    """Return the fault campaign (tests/faults/campaign.py); print its table when the session ends."""
    yield CAMPAIGN
    report_campaign()
