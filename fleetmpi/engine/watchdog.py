"""A rank's watch on its driver: when ``fleetmpi run`` is gone, stop as if sent SIGTERM.

The local launcher sets ``FLEETMPI_DRIVER_PID`` to ``PID:START`` (its pid and process start
time, so a recycled pid is not mistaken for it). mpiexec itself gets SIGTERM when the
driver dies (PR_SET_PDEATHSIG), but a wrapper script named by FLEETMPI_MPIEXEC, or another
MPI's launcher, may not pass it on; this watch covers those. The signal goes to this very
rank, whose handler checkpoints with the others and exits 4.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["DRIVER_ENV", "driver_token", "started_at", "watch_parent"]

DRIVER_ENV = "FLEETMPI_DRIVER_PID"


def started_at(pid: int | str = "self") -> float | None:
    """Return when process ``pid`` started (s since the epoch, to 10 ms), or None off Linux or once it is gone.

    /proc's start time counts clock ticks since boot: exact, unlike psutil's wall-clock guess.
    Used for start-up marks (:mod:`fleetmpi.engine.worker`, the Slurm batch steps).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _start_time(pid: int) -> float | None:
    import psutil
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def driver_token(pid: int | None = None) -> str:
    """Return the value of FLEETMPI_DRIVER_PID naming process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)!r}"


def _parse(token: str) -> tuple[int, float | None] | None:
    pid, _, start = token.partition(":")
    if not pid.isdigit():
        return None
    try:
        return int(pid), (float(start) if start not in ("", "None") else None)
    except ValueError:
        return None


def _gone(pid: int, start: float | None) -> bool:
    now = _start_time(pid)
    # A start time that differs by more than rounding means the pid was recycled.
    return now is None or (start is not None and abs(now - start) > 1.0)


def watch_parent(token: str | None = None, signum: int = signal.SIGTERM,
                 interval_s: float = 0.5) -> threading.Thread | None:
    """Send ``signum`` to this process once the driver in ``token`` ($FLEETMPI_DRIVER_PID) ends; poll every ``interval_s`` s.

    Returns the daemon thread that watches, or None when no driver is named (srun, tests).
    """
    token = os.environ.get(DRIVER_ENV, "") if token is None else token
    parsed = _parse(token) if token else None
    if parsed is None:
        return None
    pid, start = parsed
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            if _gone(pid, start):
                os.kill(os.getpid(), signum)
                return

    thread = threading.Thread(target=watch, name="fleetmpi-driver-watch", daemon=True)
    thread.start()
    return thread
