"""The driver's record of a signal comes before anything the ranks write about it.

The local driver passes SIGTERM/SIGINT/SIGUSR2 on to the ranks, which checkpoint and write
phase_exit. Its own ``driver_signal`` event used to be written by the main loop, up to a
poll interval later, so under load it could follow the ranks' phase_exit in events.jsonl
(tests/mpi/test_watch.py saw it). The handler now writes it before it passes the signal on.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

from fleetmpi.jobdir import JobDir
from fleetmpi.launch.local import LocalBackend
from fleetmpi.spec import from_raw


def _backend(tmp_path: Path) -> tuple[LocalBackend, JobDir, io.StringIO]:
    spec = from_raw({"name": "t", "data": {"train": "x.h5"}, "model": {"kind": "softmax"}, "goal": {"max_steps": 9},
                     "fleet": {"start": "a", "phases": {"a": {"ranks_per_node": 1}}}}, "spec.yaml", Path("."))
    jd = JobDir(tmp_path / "job")
    jd.create("name: t\n", "a", "local")
    out = io.StringIO()
    return LocalBackend(jd, spec, out=out), jd, out


def _events(jd: JobDir) -> list[dict]:
    return [json.loads(line) for line in jd.events.read_text().splitlines()]


def test_the_handler_records_the_signal_before_passing_it_on(tmp_path: Path) -> None:
    backend, jd, out = _backend(tmp_path)
    # A stand-in for mpiexec that notes, when the signal reaches it, what events.jsonl held then.
    probe = tmp_path / "seen"
    script = (f"import signal, time, pathlib\n"
              f"def on(s, f):\n"
              f"    pathlib.Path({str(probe)!r}).write_text(pathlib.Path({str(jd.events)!r}).read_text())\n"
              f"    raise SystemExit(0)\n"
              f"signal.signal(signal.SIGTERM, on)\n"
              f"pathlib.Path({str(probe)!r} + '.ready').touch()\n"
              f"time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        while not Path(str(probe) + ".ready").exists():
            assert proc.poll() is None
        backend._proc = proc   # type: ignore[assignment]
        backend._forward(signal.SIGTERM, None)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    seen = [json.loads(line)["event"] for line in probe.read_text().splitlines()]
    assert seen[-1] == "driver_signal"            # on disk before mpiexec got the signal
    sig = [e for e in _events(jd) if e["event"] == "driver_signal"]
    assert [(e["signal"], e["passed_on"]) for e in sig] == [("SIGTERM", "SIGTERM to mpiexec, which forwards it")]
    assert out.getvalue() == ""                    # the terminal line waits for the main loop
    backend._report_signals()
    assert "fleetmpi: received SIGTERM; passed on (SIGTERM to mpiexec, which forwards it)" in out.getvalue()
    assert len([e for e in _events(jd) if e["event"] == "driver_signal"]) == 1   # written once


def test_a_signal_with_no_phase_running_is_recorded_as_such(tmp_path: Path) -> None:
    backend, jd, out = _backend(tmp_path)
    backend._forward(signal.SIGINT, None)
    assert [(e["signal"], e["passed_on"]) for e in _events(jd) if e["event"] == "driver_signal"] == \
        [("SIGINT", "none running")]
    backend._report_signals()
    assert "fleetmpi: received SIGINT; no phase is running" in out.getvalue()
