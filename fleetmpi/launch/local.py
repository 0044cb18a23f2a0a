"""Local backend: each phase is ``mpiexec -n P python -m fleetmpi.engine.worker JOB_DIR``.

The launcher runs phases until one ends with something other than a rescale, forwards
SIGTERM/SIGINT/SIGUSR2 to the ranks as SIGTERM (they checkpoint and exit 4), and turns every
exit into an event and a one-line reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import fleetmpi
from fleetmpi.errors import BadInput, ExitCode
from fleetmpi.jobdir import JobDir
from fleetmpi.spec import Spec


def find_mpiexec(spec: Spec) -> list[str]:
    """Return the mpiexec command: $FLEETMPI_MPIEXEC > spec > next to this Python > PATH."""
    choice = os.environ.get("FLEETMPI_MPIEXEC") or spec.scheduler.mpiexec
    if choice:
        found = shutil.which(choice)
        if not found:
            raise BadInput(f"mpiexec {choice!r} (from FLEETMPI_MPIEXEC or scheduler.mpiexec) is not an executable")
        return [found]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mpiexec")
    if not found:
        raise BadInput("no mpiexec found: `pip install mpich` (or fleetmpi[mpich]) puts one next to python, "
                       "or set FLEETMPI_MPIEXEC to your cluster's mpiexec")
    return [found]


def worker_env(progress: str | None = None) -> dict[str, str]:
    """Return the environment of a rank: one thread per rank, fleetmpi importable."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(var, "1")
    root = str(Path(fleetmpi.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if progress:
        env["FLEETMPI_PROGRESS"] = progress
    return env


class LocalBackend:
    """Run a job's phases one after another on this machine."""

    def __init__(self, jd: JobDir, spec: Spec, out: TextIO = sys.stderr) -> None:
        self.jd, self.spec, self.out = jd, spec, out
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Run phases until the goal, a failure or a stop; return the exit code."""
        mpiexec = find_mpiexec(self.spec)
        progress = None
        if self.spec.monitor.progress == "auto":
            progress = "bar" if self.out.isatty() else "lines"
        prev = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
        try:
            while True:
                state = self.jd.read_state()
                phase = state["phase"]
                index = len(state.get("phases_run", []))
                ranks = self.spec.phase(phase).ranks
                cmd = [*mpiexec, "-n", str(ranks), *self.spec.scheduler.launcher_args,
                       sys.executable, "-m", "fleetmpi.engine.worker", str(self.jd.root)]
                log = self.jd.phase_log(index, phase)
                self.jd.event("launch", backend="local", phase=phase, ranks=ranks, command=cmd, log=str(log))
                t0 = time.time()
                rc = self._run_phase(cmd, log, worker_env(progress), tee=progress != "bar")
                after = self.jd.read_state()
                code = ExitCode.of(rc)
                self.jd.event("phase_exit", phase=phase, exit_code=rc, seconds=round(time.time() - t0, 3),
                              meaning=code.meaning if code is not None else "killed or crashed")
                if rc == ExitCode.RESCALE:
                    if after["phase"] == phase:
                        self._say(f"fleetmpi: phase {phase} asked for a rescale but named no new phase; stopping")
                        return ExitCode.FAILED
                    continue
                if code is None:
                    self.jd.update_state(status="FAILED", reason=f"exit code {rc}")
                    self._say(f"fleetmpi: phase {phase} failed with exit code {rc} ({_describe_rc(rc)}); "
                              f"log: {log}; `fleetmpi run {self.jd.root}` resumes from the newest checkpoint")
                    return ExitCode.FAILED
                if rc in (ExitCode.FAILED, ExitCode.BAD_INPUT):
                    self.jd.update_state(status="FAILED", reason=code.meaning)
                return rc
        finally:
            for s, h in prev.items():
                signal.signal(s, h)

    def _run_phase(self, cmd: list[str], log: Path, env: dict[str, str], tee: bool) -> int:
        with open(log, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            if not tee:
                self._proc = subprocess.Popen(cmd, env=env)
                return self._proc.wait()
            self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                logf.write(line)
                self.out.write(line.decode(errors="replace"))
                self.out.flush()
            return self._proc.wait()

    def _forward(self, signum: int, _frame: Any) -> None:
        # Hydra's mpiexec forwards SIGTERM/SIGINT/SIGUSR1 to every rank but dies on SIGUSR2,
        # so whatever reached us goes on as SIGTERM; ranks checkpoint on any of them.
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def _describe_rc(rc: int) -> str:
    sig = rc - 128 if rc > 128 else (-rc if rc < 0 else rc)
    try:
        return f"a rank ended by {signal.Signals(sig).name}"
    except ValueError:
        return "a rank crashed"
