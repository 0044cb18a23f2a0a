"""One job's directory: every path it owns, its atomic state file and append-only logs.

Compute nodes write only here; the ledger (on the login node) folds it in later.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, record: dict[str, Any], sync: bool = False) -> None:
    """Append one JSON line with a single write (O_APPEND keeps concurrent writers whole)."""
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


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
    """Paths and files of one job (see DESIGN.md, 'Job directory')."""

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

    def create(self, spec_yaml: str, start_phase: str, backend: str) -> None:
        """Create the folder tree, the spec copy and the first state; refuse a foreign folder."""
        if self.root.exists() and any(self.root.iterdir()) and not self.exists():
            raise BadInput(f"{self.root}: job dir exists, is not empty and holds no fleetmpi job "
                           "(spec.yaml, state.json); pass an empty or new --job-dir")
        for d in (self.root, self.ckpt, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.spec, spec_yaml.encode())
        self.write_state({"phase": start_phase, "status": "NEW", "backend": backend,
                          "created": time.time(), "phases_run": [], "backend_ids": []})
        self.event("created", phase=start_phase, backend=backend)

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
        atomic_write_bytes(self.state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = self.read_state()
        state.update(fields)
        self.write_state(state)
        return state

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record an event (fsynced: events are rare and must survive a crash)."""
        rec = {"t": time.time(), "event": kind, "host": socket.gethostname(), **fields}
        append_line(self.events, rec, sync=True)
        return rec

    def read_events(self) -> list[dict[str, Any]]:
        return list(read_lines(self.events))

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(read_lines(self.metrics))

    def phase_log(self, index: int, phase: str) -> Path:
        return self.logs / f"phase-{index:03d}-{phase}.log"
