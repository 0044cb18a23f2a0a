"""One job's directory: every path it owns, its atomic state file and append-only logs.

Compute nodes write only here; the ledger (on the login node) folds it in later. Files
here are never written through a symbolic link (a link planted or left in the job dir
would send the job's output elsewhere) and never made world-writable, whatever the umask.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput

# Modes passed to open/mkdir: the umask can only take bits away, so a job's files and
# folders are never group- or world-writable, even under umask 000.
FILE_MODE = 0o644
DIR_MODE = 0o755
# Entries of a job dir that fleetmpi writes; none of them may be a symbolic link.
ENTRIES = ("spec.yaml", "state.json", "events.jsonl", "metrics.jsonl", "model.h5", "approval.json",
           "logs", "ckpt", "slurm")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _link_refused(path: Path) -> BadInput:
    return BadInput(f"{path}: is a symbolic link (to {os.readlink(path)}); fleetmpi never writes a job's "
                    "files through a link; replace it with a plain file or folder (or point --job-dir "
                    "itself at the other disk)")


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` and missing parents with ``mode`` (Path.mkdir gives parents 0o777 & ~umask)."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not path.is_dir():
            raise


def open_new(path: Path, mode: int = FILE_MODE) -> int:
    """Create ``path`` exclusively (never through a link) and return its descriptor."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
    except FileExistsError:
        if Path(path).is_symlink():
            raise _link_refused(Path(path)) from None
        raise


def open_append(path: Path, mode: int = FILE_MODE) -> int:
    """Open ``path`` for appending, created if missing; BadInput if it is a symbolic link."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, mode)
    except OSError as e:
        # O_NOFOLLOW on a link fails with ELOOP (EMLINK on some BSDs).
        if e.errno in (errno.ELOOP, errno.EMLINK) and Path(path).is_symlink():
            raise _link_refused(Path(path)) from None
        raise


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to stable storage."""
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()  # a temp file left by a crashed process with the same pid
    fd = open_new(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def json_line(record: dict[str, Any]) -> bytes:
    """Return ``record`` as one compact JSON line, newline included (the JSON-lines files' format)."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSON-lines file, skipping a torn last line from a crash."""
    try:
        f = open(path)
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


class JobDir:
    """Paths and files of one job (see docs/architecture.md, 'Job directory').

    The root itself may be a symbolic link (users point it at scratch space); the entries
    in it (:data:`ENTRIES`) may not, and :meth:`check_links` refuses a job dir that has one.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    spec = property(lambda self: self.root / "spec.yaml")
    state_path = property(lambda self: self.root / "state.json")
    ckpt = property(lambda self: self.root / "ckpt")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    events = property(lambda self: self.root / "events.jsonl")
    model = property(lambda self: self.root / "model.h5")
    logs = property(lambda self: self.root / "logs")
    approval = property(lambda self: self.root / "approval.json")

    def exists(self) -> bool:
        return self.spec.is_file() and self.state_path.is_file()

    def check_links(self) -> None:
        """Raise BadInput naming the first entry of the job dir that is a symbolic link."""
        for name in ENTRIES:
            entry = self.root / name
            if entry.is_symlink():
                raise _link_refused(entry)

    def open_append(self, path: Path) -> int:
        """Open ``path`` inside the job dir for appending (O_NOFOLLOW, mode 0o644 at most).

        Every writer of a log or JSON-lines file in the job dir should open it here, so a
        symbolic link at the file or at a folder above it (inside the job dir) is refused.
        """
        path = Path(path)
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            raise ValueError(f"{path}: not inside the job dir {self.root}") from None
        self.check_links()
        here = self.root
        for part in rel.parts[:-1]:
            here = here / part
            if here.is_symlink():
                raise _link_refused(here)
        return open_append(path)

    def append_line(self, path: Path, record: dict[str, Any], sync: bool = False) -> None:
        """Append one JSON line to ``path`` inside the job dir in one write (O_APPEND keeps concurrent
        writers whole; see :meth:`open_append`)."""
        data = json_line(record)
        fd = self.open_append(path)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, spec_yaml: str, start_phase: str, backend: str) -> None:
        """Create the folder tree, the spec copy and the first state; refuse a foreign folder.

        All or nothing: a creation that fails (a full disk) removes what it made, and one
        that was killed half-way (no state.json yet) is created again over its leftovers.
        """
        if self.root.exists() and any(self.root.iterdir()) and not self.exists() and not self._half_created():
            raise BadInput(f"{self.root}: job dir exists, is not empty and holds no fleetmpi job "
                           "(spec.yaml, state.json); pass an empty or new --job-dir")
        fresh = not self.root.exists()
        try:
            make_dirs(self.root)
            self.check_links()
            for d in (self.ckpt, self.logs):
                make_dirs(d)
            atomic_write_bytes(self.spec, spec_yaml.encode())
            self.write_state({"phase": start_phase, "status": "NEW", "backend": backend,
                              "created": time.time(), "phases_run": [], "backend_ids": []})
            self.event("created", phase=start_phase, backend=backend)
        except OSError:
            self._undo_create(fresh)
            raise

    def _half_created(self) -> bool:
        """Return whether the folder holds only what an interrupted ``create`` leaves (no state.json)."""
        for entry in self.root.iterdir():
            if entry.name in ("ckpt", "logs") and entry.is_dir() and not entry.is_symlink():
                if any(entry.iterdir()):
                    return False
            elif entry.name not in ("spec.yaml", "events.jsonl") and not entry.name.startswith("."):
                return False
        return True

    def _undo_create(self, fresh: bool) -> None:
        """Remove what a failed ``create`` made: the whole folder if it made it, else its own entries."""
        import shutil
        if fresh:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for name in ("ckpt", "logs"):
            with contextlib.suppress(OSError):
                (self.root / name).rmdir()
        for path in (self.spec, self.state_path, self.events):
            with contextlib.suppress(OSError):
                path.unlink()

    def read_state(self) -> dict[str, Any]:
        """Return state.json; BadInput unless it holds a JSON object."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise BadInput(f"{self.state_path}: missing; {self.root} is not a fleetmpi job dir") from None
        except json.JSONDecodeError as e:
            raise BadInput(f"{self.state_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(state, dict):
            raise BadInput(f"{self.state_path}: expected a JSON object, got a JSON {type(state).__name__}; "
                           "the file was edited or damaged")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically; BadInput if an entry of the job dir is a link."""
        self.check_links()
        atomic_write_bytes(self.state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = self.read_state()
        state.update(fields)
        self.write_state(state)
        return state

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record an event (fsynced: events are rare and must survive a crash)."""
        rec = {"t": time.time(), "event": kind, "host": socket.gethostname(), **fields}
        self.append_line(self.events, rec, sync=True)
        return rec

    def read_events(self) -> list[dict[str, Any]]:
        return list(read_lines(self.events))

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(read_lines(self.metrics))

    def phase_log(self, index: int, phase: str) -> Path:
        """Return the log file of run ``index`` of ``phase``, created (mode 0o644 at most) if missing.

        Creating it here means a caller that then opens it with ``open(log, "ab")`` keeps
        the safe mode; a link at logs/ or at the file is refused first.
        """
        log = self.logs / f"phase-{index:03d}-{phase}.log"
        os.close(self.open_append(log))
        return log
