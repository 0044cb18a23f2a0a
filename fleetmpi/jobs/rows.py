"""The ledger's SQLite schema: versioned DDL, migrations, connections and row types.

Versions live in ``PRAGMA user_version``; :data:`MIGRATIONS` holds one step per version
(append a step, never edit a shipped one) and :func:`migrate` applies the missing ones in
one transaction. Status changes are not made here: see fleetmpi.jobs.ledger.

Damage is reported as ``sqlite3.DatabaseError`` from here (a file that is not SQLite, a
failed ``quick_check``, a row whose values do not have their column's type) so that the
ledger turns every kind into one message with the way to recover.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput

_V1 = """
CREATE TABLE jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, owner TEXT NOT NULL,
  spec_path TEXT NOT NULL, spec_hash TEXT NOT NULL, job_dir TEXT NOT NULL UNIQUE,
  backend TEXT NOT NULL, status TEXT NOT NULL, phase TEXT, shape TEXT,
  attempts INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
  max_attempts INTEGER NOT NULL, backoff_s REAL NOT NULL, not_before REAL NOT NULL DEFAULT 0,
  claimed_by TEXT, created REAL NOT NULL, updated REAL NOT NULL, started REAL, ended REAL,
  last_error TEXT, events_offset INTEGER NOT NULL DEFAULT 0);
CREATE TABLE allocations (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
  attempt INTEGER NOT NULL, backend TEXT NOT NULL, backend_id TEXT NOT NULL, host TEXT,
  phase TEXT, shape TEXT, state TEXT NOT NULL, exit_code INTEGER, log TEXT,
  info TEXT NOT NULL DEFAULT '{}', started REAL NOT NULL, ended REAL, reason TEXT);
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
  t REAL NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX events_job ON events(job_id, id);
CREATE INDEX allocations_job ON allocations(job_id)
"""
_V2 = """
ALTER TABLE jobs ADD COLUMN notify TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN progress TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN result TEXT;
CREATE TABLE notifications (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
  on_event TEXT NOT NULL, channel TEXT NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
  status TEXT NOT NULL, reason TEXT, state TEXT NOT NULL DEFAULT 'PENDING',
  tries INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, claimed_by TEXT,
  sent REAL, last_error TEXT, UNIQUE (job_id, on_event, channel))
"""
_V3 = """
CREATE INDEX jobs_status ON jobs(status, owner);
CREATE INDEX allocations_live ON allocations(backend) WHERE ended IS NULL;
CREATE INDEX notifications_pending ON notifications(next_try) WHERE state = 'PENDING'
"""
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)
JSON_COLUMNS = ("notify", "progress", "result", "info", "data")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to version ``target`` in one transaction; return the version found."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise BadInput(f"ledger schema version {found} is newer than this fleetmpi knows "
                           f"({SCHEMA_VERSION}); upgrade fleetmpi")
        for version in range(found, target):
            for stmt in _statements(MIGRATIONS[version]):
                conn.execute(stmt)
        if target > found:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _layout(conn: sqlite3.Connection) -> list[tuple[str, ...]]:
    """Return the schema records (type, name, table, SQL) in a fixed order."""
    return sorted(tuple(str(v) for v in r) for r in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))


@functools.cache
def _expected_layout() -> list[tuple[str, ...]]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn)
        return _layout(conn)
    finally:
        conn.close()


def check_layout(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError unless the schema records are the ones the migrations write.

    quick_check verifies pages, not the schema's text: a flipped byte in a CREATE statement
    (a column renamed, a type changed) passes it and would surface only at the first query
    that touches that column, possibly after the manager has launched jobs from the ledger.
    Migrations only append (ALTER TABLE ADD COLUMN rewrites the stored CREATE text the same
    way on an old ledger as on a new one), so a current ledger's records equal a fresh one's.
    """
    found, want = _layout(conn), _expected_layout()
    if found != want:
        odd = sorted({r[1] for r in set(found) ^ set(want)})
        raise sqlite3.DatabaseError(f"schema: {', '.join(odd)} not as fleetmpi wrote it (a damaged schema record)")


SQLITE_HEADER = b"SQLite format 3\x00"
DB_MODE = 0o600  # the ledger holds every user's job names, paths and notify targets


def check_header(path: Path) -> None:
    """Raise sqlite3.DatabaseError unless ``path`` is empty or starts with SQLite's 16-byte header."""
    with open(path, "rb") as f:
        head = f.read(100)
    if head and (len(head) < 100 or not head.startswith(SQLITE_HEADER)):
        what = "truncated inside its header" if head.startswith(SQLITE_HEADER[:len(head)]) else "not an SQLite file"
        raise sqlite3.DatabaseError(f"{what} (first bytes {head[:16]!r})")


def connect(path: Path, check: bool = True) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit), WAL, 60 s busy wait.

    A missing file is created with mode 0o600 (SQLite gives its -wal and -shm files the
    same mode). With ``check``, the header and ``PRAGMA quick_check`` must pass.
    """
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, DB_MODE))
    except FileExistsError:
        pass
    if check:
        check_header(path)
    conn = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        if check:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"quick_check: {'; '.join(problems)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def decode_row(row: sqlite3.Row) -> dict[str, Any]:
    """Return ``row`` as a dict with its JSON columns decoded; DatabaseError if one is not JSON."""
    d = dict(zip(row.keys(), row))
    for k in JSON_COLUMNS:
        if k in d and d[k] is not None:
            try:
                d[k] = json.loads(d[k])
            except (json.JSONDecodeError, TypeError) as e:
                raise sqlite3.DatabaseError(f"column {k!r} of row {d.get('id')} is not JSON ({e})") from None
    return d


def _matches(value: Any, hint: Any) -> bool:
    """Return whether ``value`` fits the type hint of a row field (a damaged row may not)."""
    if isinstance(hint, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def typed_row(cls: Any, d: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from ``d``; DatabaseError if a value has the wrong type."""
    hints = _hints(cls)
    for f in fields(cls):
        if f.name not in d or not _matches(d[f.name], hints[f.name]):
            raise sqlite3.DatabaseError(f"{cls.__name__} {d.get('id')}: column {f.name!r} holds "
                                        f"{d.get(f.name)!r:.40}, not a {hints[f.name]}")
    return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class JobRow:
    """One row of ``jobs``."""

    id: int
    name: str
    owner: str
    spec_path: str
    spec_hash: str
    job_dir: str
    backend: str
    status: str
    phase: str | None
    shape: str | None
    attempts: int
    failures: int
    max_attempts: int
    backoff_s: float
    not_before: float
    claimed_by: str | None
    created: float
    updated: float
    started: float | None
    ended: float | None
    last_error: str | None
    events_offset: int
    notify: list[dict[str, Any]]
    progress: dict[str, Any]
    result: dict[str, Any] | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> JobRow:
        return typed_row(cls, decode_row(row))


@dataclass(frozen=True)
class AllocRow:
    """One row of ``allocations``: one local or Slurm launch."""

    id: int
    job_id: int
    attempt: int
    backend: str
    backend_id: str
    host: str | None
    phase: str | None
    shape: str | None
    state: str
    exit_code: int | None
    log: str | None
    info: dict[str, Any]
    started: float
    ended: float | None
    reason: str | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> AllocRow:
        return typed_row(cls, decode_row(row))


@dataclass(frozen=True)
class NoteRow:
    """One queued notification (one channel of one notify entry, for one job event)."""

    id: int
    job_id: int
    on_event: str
    channel: str
    kind: str
    target: str
    status: str
    reason: str | None
    tries: int
