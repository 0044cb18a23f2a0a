"""One writer per job dir: an flock on ``JOB_DIR/lock`` and a holder record beside it.

``fleetmpi run`` holds the lock for the whole run, a Slurm allocation's batch script for the
life of the allocation, and the manager hands it to the runner it launches. The kernel's
flock is the truth (it ends with the last process holding the open file, however that
process ends); ``JOB_DIR/lock.holder`` (JSON: pid, host, started, command) only says who
holds it, for the refusal message. A holder record left by a holder that did not release
(it was killed) is reported as a takeover (event ``lock_taken_over``).

A process can receive the lock from its parent: the parent opens the lock file, takes the
flock and passes the open file to the child (``FLEETMPI_LOCK_FD``); the flock belongs to
the open file, so the child holds it from birth and no other process can slip in between.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fleetmpi.errors import BadInput
from fleetmpi.jobdir import JobDir, atomic_write_bytes

__all__ = ["LOCK_FD_ENV", "JobDirBusy", "JobLock", "read_holder", "writer_may_be_alive"]

LOCK_FD_ENV = "FLEETMPI_LOCK_FD"


class JobDirBusy(BadInput):
    """Another live process holds the job dir's lock."""


def read_holder(jd: JobDir) -> dict[str, Any] | None:
    """Return the holder record of ``jd``'s lock, or None when there is none (or it is unreadable)."""
    try:
        rec = json.loads(_holder_path(jd).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def writer_may_be_alive(jd: JobDir) -> bool:
    """Return whether a holder of ``jd``'s lock may still be writing (without touching the lock).

    False when no holder is recorded, or the recorded holder is a dead pid of this host; a
    holder on another host cannot be asked, so True. Readers only: taking even a shared
    flock to find out could make a starting writer's non-blocking try fail.
    """
    holder = read_holder(jd)
    if holder is None:
        return False
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return _alive(pid)
    return True


class JobLock:
    """Hold ``JOB_DIR/lock`` exclusively; a context manager that releases on every exit path.

    ``wait_s``: how long to wait for a busy lock before refusing (0: refuse at once).
    ``pid``: the pid to record as holder (default this process; a batch step records its shell).
    """

    def __init__(self, jd: JobDir, command: str, wait_s: float = 0.0, pid: int | None = None) -> None:
        self.jd, self.command, self.wait_s = jd, command, wait_s
        self.pid = os.getpid() if pid is None else pid
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None

    def acquire(self) -> JobLock:
        """Take the lock or raise JobDirBusy naming the holder; record this holder."""
        path = self.jd.root / "lock"
        fd = _inherited_fd(path)
        handed = fd is not None
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise JobDirBusy(_busy_message(self.jd))
            # Short: a Slurm phase's `begin` waits here for the phase before it to finish its
            # continuation, on the rescale's critical path; a try is one flock call.
            time.sleep(0.02)
        self.fd = fd
        old = read_holder(self.jd)
        mine = old is not None and old.get("pid") == self.pid and old.get("host") == socket.gethostname()
        if old is not None and not mine and not handed:
            # The last holder never released (it was killed): whatever it wrote is checked by
            # the next start (checkpoints are verified, temps of dead pids removed).
            self.taken_over = old
            self.jd.event("lock_taken_over", old_holder=old, pid=self.pid, command=self.command)
        record = {"pid": self.pid, "host": socket.gethostname(), "started": time.time(), "command": self.command}
        atomic_write_bytes(_holder_path(self.jd), (json.dumps(record, sort_keys=True) + "\n").encode())
        return self

    def release(self) -> None:
        """Drop the holder record, then the flock (the record never outlives a clean holder)."""
        if self.fd is None:
            return
        try:
            _holder_path(self.jd).unlink(missing_ok=True)
        finally:
            # LOCK_UN releases the open file for every process sharing it (children given it too).
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def fileno(self) -> int:
        """Return the descriptor of the held lock file (to pass to a child); ValueError when not held."""
        if self.fd is None:
            raise ValueError(f"{self.jd.root}/lock is not held by this JobLock")
        return self.fd

    def hand_over(self) -> None:
        """Close this process's copy of the lock, leaving it held by the children given the open file."""
        if self.fd is not None:
            os.close(self.fd)   # no LOCK_UN: that would release the children's lock too
            self.fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder_path(jd: JobDir) -> Path:
    return jd.root / "lock.holder"


def _inherited_fd(path: Path) -> int | None:
    """Return the lock file descriptor a parent passed in FLEETMPI_LOCK_FD, if it is this job's lock."""
    value = os.environ.get(LOCK_FD_ENV, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        mine, theirs = os.stat(path), os.fstat(fd)
    except OSError:
        return None
    # Anything else under that number (a stale variable in a shell) is not ours to lock.
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        return None
    return fd


def _busy_message(jd: JobDir) -> str:
    holder = read_holder(jd)
    if holder is None:
        return (f"{jd.root} is in use by another process (it holds {jd.root}/lock but has not recorded itself yet); "
                "wait for it to end, or use another job dir")
    pid, host = holder.get("pid"), holder.get("host")
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    what = f"{jd.root} is in use by pid {pid} on {host} ({holder.get('command')}, since {when})"
    if host == socket.gethostname():
        if isinstance(pid, int) and _alive(pid):
            return f"{what}; wait for it to end or stop it (kill -TERM {pid} checkpoints), then run again"
        return (f"{what}; pid {pid} has ended but processes it started (mpiexec, ranks) still hold "
                f"{jd.root}/lock: `fuser -v {jd.root}/lock` lists them; they checkpoint on SIGTERM")
    return (f"{what}; stop it on {host} (kill -TERM {pid}), or if nothing there runs it any more the shared "
            f"file system kept a stale lock: remove {jd.root}/lock and {jd.root}/lock.holder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
