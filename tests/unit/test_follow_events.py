"""`events --follow` ends when the job dir's writer has gone, not at the first ended status.

Rank 0 writes the final status (STOPPED, COMPLETED...) before the launcher writes the
phase's exit and lets go of the lock; a follower that stopped at the status lost the
last lines (tests/mpi/test_watch.py failed on it once under load).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fleetmpi.cli.watch import follow_events, job_over
from fleetmpi.jobdir import JobDir, atomic_write_bytes


def _job(tmp_path: Path, status: str, holder: dict | None) -> JobDir:
    jd = JobDir(tmp_path / "job")
    jd.root.mkdir()
    jd.write_state({"status": status, "phase": "one"})
    jd.event("phase_start", phase="one")
    if holder is not None:
        atomic_write_bytes(jd.root / "lock.holder", (json.dumps(holder) + "\n").encode())
    return jd


def _follow(jd: JobDir, done=None) -> tuple[threading.Thread, io.StringIO]:  # type: ignore[no-untyped-def]
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            follow_events(jd, as_json=True, poll_s=0.02, done=done)
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_follow_reads_what_the_writer_adds_after_the_final_status(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        jd = _job(tmp_path, "STOPPED", {"pid": writer.pid, "host": socket.gethostname(), "command": "fleetmpi run"})
        t, out = _follow(jd)
        time.sleep(0.3)
        assert t.is_alive(), "the follower ended while the job dir's writer was still alive"
        jd.event("phase_exit", phase="one", exit_code=4)
        (jd.root / "lock.holder").unlink()   # the writer lets go
    finally:
        writer.kill()
        writer.wait()
    t.join(timeout=10)
    assert not t.is_alive()
    kinds = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert kinds == ["phase_start", "phase_exit"], kinds


def test_a_dead_holder_or_none_ends_the_follow_at_once(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jd = _job(tmp_path, "COMPLETED", {"pid": dead.pid, "host": socket.gethostname(), "command": "fleetmpi run"})
    assert job_over(jd)()
    (jd.root / "lock.holder").unlink()
    assert job_over(jd)()


def test_a_holder_elsewhere_is_waited_for_only_the_grace(tmp_path: Path) -> None:
    jd = _job(tmp_path, "FAILED", {"pid": 1, "host": "another-node", "command": "slurm job 7"})
    over = job_over(jd, grace_s=0.3)
    assert not over()
    time.sleep(0.35)
    assert over()


def test_a_running_job_is_not_over(tmp_path: Path) -> None:
    jd = _job(tmp_path, "RUNNING", None)
    assert not job_over(jd)()
