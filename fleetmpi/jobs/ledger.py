"""SQLite job ledger: jobs, allocations, events, notifications, and every status change.

The ledger is ``$FLEETMPI_HOME/ledger.db`` (default ``~/.fleetmpi``) on the login node.
Compute nodes never open it: they write their job directory, and the manager folds that
in (``events.jsonl`` is read from a byte offset kept here).

This module owns every job status change. :data:`TRANSITIONS` lists the allowed ones;
each change is a compare-and-set inside ``BEGIN IMMEDIATE``, so of two managers acting on
the same job one wins and the other gets ``False``. An illegal change raises
:class:`IllegalTransition`. Notifications are queued in the transaction that makes a job
terminal (or folds a rescale), and claimed in one transaction, so each goes out once.

The schema, its migrations and the row types are in fleetmpi.jobs.rows.

A damaged ledger (not SQLite, truncated, failing ``quick_check`` on open or, before the
manager acts, ``integrity_check``, a row of the wrong
type, or emptied while job dirs exist) is never used nor silently replaced: every public
method raises :class:`LedgerDamaged` (exit 2, one line naming the file, the newest
backup and ``fleetmpi ledger rebuild``). :meth:`Ledger.backup` keeps rolling copies in
``$FLEETMPI_HOME/backups``; fleetmpi.jobs.rebuild makes a new ledger from the
job dirs in ``$FLEETMPI_HOME/jobs``. A job id is never reused while a job dir
``jobs/<id>-<name>`` exists, even when the ledger is behind the folder.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from fleetmpi.errors import BadInput, one_line
from fleetmpi.jobdir import fsync_dir, make_dirs, open_new
from fleetmpi.jobs.rows import (
    DB_MODE,
    JSON_COLUMNS,
    AllocRow,
    JobRow,
    NoteRow,
    check_layout,
    connect,
    decode_row,
    migrate,
)

NEW, LAUNCHED, RUNNING, RESCALING = "NEW", "LAUNCHED", "RUNNING", "RESCALING"
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
ACTIVE = frozenset({LAUNCHED, RUNNING, RESCALING})
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# NEW is also where a job waits (not_before) for a retry or a continuation.
TRANSITIONS: dict[str, frozenset[str]] = {
    NEW: frozenset({LAUNCHED, CANCELLED}),
    LAUNCHED: frozenset({RUNNING, RESCALING, NEW, COMPLETED, FAILED, CANCELLED}),
    RUNNING: frozenset({RESCALING, NEW, COMPLETED, FAILED, CANCELLED}),
    RESCALING: frozenset({RUNNING, NEW, COMPLETED, FAILED, CANCELLED}),
    COMPLETED: frozenset(), FAILED: frozenset(), CANCELLED: frozenset(),
}

# Columns a caller may set beside the status (names go into SQL, so they are whitelisted).
_SETTABLE = frozenset({"phase", "shape", "failures", "not_before", "claimed_by", "started", "result", "progress"})


class IllegalTransition(ValueError):
    """A status change that TRANSITIONS does not allow."""


class JobNotFound(BadInput):
    """No job in the ledger has that id or name."""


class QueueFull(BadInput):
    """The owner already has max_queued jobs waiting (status NEW)."""


class LedgerDamaged(BadInput):
    """The ledger file is not a sound SQLite ledger; the message says how to recover."""


HOME_MODE = 0o700  # private: the ledger and job list of one user
_DIR_ID = re.compile(r"^(\d+)-")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def home(create: bool = True) -> Path:
    """Return $FLEETMPI_HOME (default ~/.fleetmpi), created (mode 0o700) if missing unless ``create`` is False."""
    path = Path(os.environ.get("FLEETMPI_HOME") or Path.home() / ".fleetmpi").expanduser()
    if create:
        make_dirs(path, HOME_MODE)
    return path


def job_dir_ids(jobs_dir: Path) -> list[int]:
    """Return the ids of the job dirs ``<id>-<name>`` in ``jobs_dir``, sorted."""
    try:
        with os.scandir(jobs_dir) as entries:
            names = [e.name for e in entries if e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(_DIR_ID.match, names) if m)


def newest_backup(home_dir: Path) -> Path | None:
    """Return the newest ``backups/ledger-*.db`` under ``home_dir``, or None."""
    found = sorted((home_dir / "backups").glob("ledger-*.db"))
    return found[-1] if found else None


def damaged(path: Path, what: str) -> LedgerDamaged:
    """Return the one-line error for a damaged ledger at ``path``, with both ways to recover."""
    backup = newest_backup(path.parent)
    restore = (f"stop the manager, then `cp {backup} {path}` and delete {path}-wal and {path}-shm"
               if backup else f"no backup exists in {path.parent / 'backups'}")
    # SQLite quotes damaged bytes back: escape control characters so the message stays one line.
    what = "".join(c if c.isprintable() else repr(c)[1:-1] for c in one_line(what))
    return LedgerDamaged(f"{path}: the job ledger is damaged ({what}); to recover: {restore}; "
                         f"or run `fleetmpi ledger rebuild` to rebuild it from the job dirs in {path.parent / 'jobs'}")


def _guarded(method: Callable[Concatenate[Ledger, _P], _R]) -> Callable[Concatenate[Ledger, _P], _R]:
    """Turn damage errors inside ``method`` into LedgerDamaged (a busy or read-only ledger is not damaged)."""
    @functools.wraps(method)
    def run(self: Ledger, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
            # UnicodeDecodeError: a flipped byte in a text value no longer decodes.
            text = str(e)
            if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "readonly" in text):
                raise
            if isinstance(e, sqlite3.IntegrityError):
                raise   # a constraint the caller broke (a bug to see), not a damaged file
            raise damaged(self.path, text) from e
    return run


def check_transition(frm: str, to: str) -> None:
    """Raise IllegalTransition unless ``frm -> to`` is in TRANSITIONS."""
    if frm not in TRANSITIONS or to not in TRANSITIONS:
        raise IllegalTransition(f"unknown job status in {frm!r} -> {to!r}; statuses: {', '.join(TRANSITIONS)}")
    if to not in TRANSITIONS[frm]:
        allowed = ", ".join(sorted(TRANSITIONS[frm])) or "none (terminal)"
        raise IllegalTransition(f"job status {frm} -> {to} is not allowed; from {frm}: {allowed}")


class Ledger:
    """The job ledger; every method is one transaction."""

    @_guarded
    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else home() / "ledger.db"
        make_dirs(self.path.parent, HOME_MODE)
        if self.path.is_file() and self.path.stat().st_size == 0:
            # An empty file is what SQLite makes of a new ledger, but with job dirs beside it
            # the ledger was lost: starting empty would hide those jobs and reuse their ids.
            ids = job_dir_ids(self.jobs_dir)
            if ids:
                raise damaged(self.path, f"the file is empty but {len(ids)} job dirs exist, ids {ids[0]} to {ids[-1]}")
        self.conn = connect(self.path)
        try:
            migrate(self.conn)
            check_layout(self.conn)
        except BaseException:
            self.conn.close()
            raise

    @property
    def jobs_dir(self) -> Path:
        """Return the folder of default job dirs (``jobs/`` beside the ledger file)."""
        return self.path.parent / "jobs"

    @classmethod
    def existing(cls, path: Path | str | None = None) -> Ledger | None:
        """Open the ledger if its file exists (commands that only look never create one)."""
        p = Path(path) if path is not None else home(create=False) / "ledger.db"
        return cls(p) if p.is_file() else None

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """Run a block inside BEGIN IMMEDIATE (the write lock); commit, or roll back on error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def newest_backup_age_s(self) -> float | None:
        """Return the age in seconds of the newest backup, or None when there is none."""
        found = sorted((self.path.parent / "backups").glob("ledger-*.db"))
        return time.time() - found[-1].stat().st_mtime if found else None

    @_guarded
    def check(self) -> None:
        """Raise LedgerDamaged unless SQLite's ``integrity_check`` passes.

        Opening runs ``quick_check`` (pages and rows), which does not compare an index with
        its table: a flipped byte in an index entry reads fine until a write to that row
        finds it ("malformed"). The manager checks fully before it first acts, so it never
        launches a job and then stops half-way through a cycle. 39 ms over a 12 MB ledger
        of 10,000 jobs (quick_check 18 ms, reading the jobs table 44 ms).
        """
        problems = [r[0] for r in self.conn.execute("PRAGMA integrity_check(5)").fetchall()]
        if problems != ["ok"]:
            raise damaged(self.path, f"integrity_check: {'; '.join(problems)}")

    @_guarded
    def backup(self, keep: int = 24) -> Path:
        """Copy the ledger, consistent while in use, to ``backups/ledger-YYYYmmdd-HHMMSS.db``; keep the newest ``keep``.

        A ledger that fails ``quick_check`` is not copied (LedgerDamaged), so a damaged
        file never pushes the good backups out.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"backup keep={keep!r} is not valid (expected an integer >= 1)")
        self.check()
        folder = self.path.parent / "backups"
        make_dirs(folder, HOME_MODE)
        os.chmod(folder, HOME_MODE)  # copies of the ledger are as private as the ledger
        dest = folder / f"ledger-{time.strftime('%Y%m%d-%H%M%S')}.db"
        tmp = folder / f".{dest.name}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crashed process with the same pid
        os.close(open_new(tmp, DB_MODE))
        try:
            copy = sqlite3.connect(tmp, isolation_level=None)
            try:
                self.conn.backup(copy)
                # A rollback-journal copy is one self-contained file: `cp` restores it.
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                copy.close()
            fsync_file(tmp)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(folder)
        for old in sorted(folder.glob("ledger-*.db"))[:-keep]:
            old.unlink()
        return dest

    # -- jobs -----------------------------------------------------------------------------
    @_guarded
    def add_job(self, *, name: str, spec_path: str, spec_hash: str, backend: str, phase: str, shape: str,
                max_attempts: int, backoff_s: float, notify: Sequence[dict[str, Any]],
                make_dir: Callable[[int], str], owner: str | None = None, max_queued: int | None = None) -> int:
        """Register a NEW job; ``make_dir(id)`` creates its job dir inside the transaction."""
        owner = owner or getpass.getuser()
        now = time.time()
        with self.write() as c:
            if max_queued is not None:
                waiting = c.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND status=?", (owner, NEW)).fetchone()[0]
                if waiting >= max_queued:
                    raise QueueFull(f"{owner} already has {waiting} queued (NEW) jobs, the limit "
                                    f"(--max-queued or FLEETMPI_MAX_QUEUED) is {max_queued}; wait or cancel some")
            # Never hand out an id whose job dir exists (a ledger restored from a backup or
            # rebuilt is behind the jobs folder): the default dir of id N is jobs/N-NAME.
            seq = c.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchone()
            dirs = job_dir_ids(self.jobs_dir)
            new_id = max(seq[0] if seq else 0, dirs[-1] if dirs else 0) + 1
            cur = c.execute(
                "INSERT INTO jobs (id, name, owner, spec_path, spec_hash, job_dir, backend, status, phase, shape,"
                " max_attempts, backoff_s, created, updated, notify) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (new_id, name, owner, spec_path, spec_hash, f"<pending {now}>", backend, NEW, phase, shape,
                 max_attempts, backoff_s, now, now, json.dumps(list(notify))))
            job_id = int(cur.lastrowid or 0)
            c.execute("UPDATE jobs SET job_dir=? WHERE id=?", (make_dir(job_id), job_id))
            self._event(c, job_id, "manager", "queued", owner=owner, spec=spec_path)
        return job_id

    @_guarded
    def get(self, job_id: int) -> JobRow:
        row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id} in {self.path}")
        return JobRow.of(row)

    @_guarded
    def find(self, ref: str | int) -> JobRow:
        """Return the job with id ``ref``, or the one job named ``ref``; BadInput otherwise."""
        text = str(ref)
        if text.isdigit():
            row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (int(text),)).fetchone()
            if row is not None:
                return JobRow.of(row)
        rows = self.conn.execute("SELECT * FROM jobs WHERE name=? ORDER BY id", (text,)).fetchall()
        if len(rows) == 1:
            return JobRow.of(rows[0])
        if rows:
            ids = ", ".join(str(r["id"]) for r in rows)
            raise BadInput(f"job name {text!r} is ambiguous in {self.path}: ids {ids}; pass an id")
        raise JobNotFound(f"no job {text!r} in {self.path} (pass a job id or name; `fleetmpi status` lists them)")

    @_guarded
    def jobs(self, statuses: Iterable[str] | None = None) -> list[JobRow]:
        if statuses is None:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        else:
            st = sorted(statuses)
            rows = self.conn.execute(f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(st))}) ORDER BY id",
                                     st).fetchall()
        return [JobRow.of(r) for r in rows]

    @_guarded
    def launchable(self, now: float) -> list[JobRow]:
        """Return NEW jobs whose wait is over, oldest first."""
        rows = self.conn.execute("SELECT * FROM jobs WHERE status=? AND not_before<=? ORDER BY id", (NEW, now))
        return [JobRow.of(r) for r in rows.fetchall()]

    @_guarded
    def next_due(self, now: float) -> float | None:
        """Return the earliest not_before after ``now`` of a NEW job (a retry's wait), or None."""
        due = self.conn.execute("SELECT MIN(not_before) FROM jobs WHERE status=? AND not_before>?",
                                (NEW, now)).fetchone()[0]
        return None if due is None else float(due)

    @_guarded
    def claim(self, job_id: int, by: str, now: float, max_running: int | None = None) -> bool:
        """NEW -> LAUNCHED for ``by`` (attempts + 1) unless another manager or the limit got there first."""
        check_transition(NEW, LAUNCHED)
        active = sorted(ACTIVE)
        limit = "" if max_running is None else (
            f" AND (SELECT COUNT(*) FROM jobs o WHERE o.owner=jobs.owner AND o.status IN ({','.join('?' * len(active))}))"
            " < ?")
        args: list[Any] = [LAUNCHED, by, now, job_id, NEW, now]
        if max_running is not None:
            args += [*active, max_running]
        with self.write() as c:
            cur = c.execute("UPDATE jobs SET status=?, claimed_by=?, attempts=attempts+1, updated=? "
                            "WHERE id=? AND status=? AND not_before<=?" + limit, args)
            if cur.rowcount != 1:
                return False
            self._event(c, job_id, "manager", "claimed", by=by)
        return True

    @_guarded
    def reopen(self, job_id: int, by: str, now: float) -> bool:
        """Ended job -> LAUNCHED for ``by`` (attempts + 1): a person ran its job dir again (`fleetmpi run`).

        The one way out of a terminal status: the job dir is the job, so a rerun (a raised
        budget, a resume after a failure) continues the same ledger row.
        """
        with self.write() as c:
            cur = c.execute("UPDATE jobs SET status=?, claimed_by=?, attempts=attempts+1, ended=NULL, updated=? "
                            f"WHERE id=? AND status IN ({','.join('?' * len(TERMINAL))})",
                            [LAUNCHED, by, now, job_id, *sorted(TERMINAL)])
            if cur.rowcount != 1:
                return False
            self._event(c, job_id, "manager", "reopened", by=by)
        return True

    @_guarded
    def transition(self, job_id: int, to: str, *, expect: Iterable[str] | None = None, reason: str | None = None,
                   **values: Any) -> bool:
        """Change a job's status; False if its status is not in ``expect`` (someone else acted)."""
        with self.write() as c:
            return self._transition(c, job_id, to, expect, reason, values)

    def _transition(self, c: sqlite3.Connection, job_id: int, to: str, expect: Iterable[str] | None,
                    reason: str | None, values: dict[str, Any]) -> bool:
        row = c.execute("SELECT status, notify FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id} in {self.path}")
        frm = row["status"]
        if expect is not None and frm not in set(expect):
            return False
        check_transition(frm, to)
        bad = set(values) - _SETTABLE
        if bad:
            raise ValueError(f"cannot set {', '.join(sorted(bad))}; settable: {', '.join(sorted(_SETTABLE))}")
        now = time.time()
        sets: dict[str, Any] = {"status": to, "updated": now,
                                **{k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}}
        if to in TERMINAL:
            sets["ended"] = now
        if reason is not None:
            sets["last_error"] = reason
        c.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in sets)} WHERE id=? AND status=?",
                  [*sets.values(), job_id, frm])
        self._event(c, job_id, "manager", "status", **{"from": frm, "to": to, "reason": reason})
        if to in TERMINAL:
            self._queue_notes(c, job_id, json.loads(row["notify"]), "terminal", "terminal", to, reason)
        return True

    @_guarded
    def fold(self, job_id: int, offset: int, new_offset: int, events: Sequence[dict[str, Any]],
             progress: dict[str, Any] | None = None) -> bool:
        """Fold job-dir events read from ``offset`` to ``new_offset``; False if already folded."""
        with self.write() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["events_offset"] != offset:
                return False
            job = JobRow.of(row)
            status = job.status
            for ev in events:
                kind = str(ev.get("event", "?"))
                c.execute("INSERT INTO events (job_id, t, source, kind, data) VALUES (?,?,?,?,?)",
                          (job_id, float(ev.get("t", time.time())), "job", kind, json.dumps(ev)))
                if status not in ACTIVE:
                    continue  # a late fold of a job that already moved on: record only
                if kind == "phase_start":
                    new = {"phase": ev.get("phase"), "shape": ev.get("shape")}
                    if job.started is None:
                        new["started"] = ev.get("t")
                    if status != RUNNING:
                        self._transition(c, job_id, RUNNING, None, None, new)
                        status = RUNNING
                    else:
                        c.execute("UPDATE jobs SET phase=?, shape=? WHERE id=?", (new["phase"], new["shape"], job_id))
                elif kind == "rescale":
                    new = {"phase": ev.get("to"), "shape": ev.get("shape")}
                    if status != RESCALING:
                        self._transition(c, job_id, RESCALING, None, None, new)
                        status = RESCALING
                    else:
                        c.execute("UPDATE jobs SET phase=?, shape=? WHERE id=?", (new["phase"], new["shape"], job_id))
                    why = f"{ev.get('from')} -> {ev.get('to')} ({ev.get('to_ranks')} ranks) at step {ev.get('step')}"
                    self._queue_notes(c, job_id, job.notify, f"rescale@{ev.get('step')}", "rescale", RESCALING, why)
                elif kind == "approval_pending":   # approval: manual; training goes on in this phase meanwhile
                    why = (f"rule {ev.get('rule')} wants a rescale {job.phase} -> {ev.get('goto')} at step "
                           f"{ev.get('step')}; training goes on in phase {job.phase} until approved: "
                           f"fleetmpi approve {job.job_dir}")
                    self._queue_notes(c, job_id, job.notify, f"approval@{ev.get('id')}", "approval",
                                      "APPROVAL_PENDING", why)
                elif kind == "goal":
                    keep = ("step", "epoch", "reason", "loss", "valid_loss", "model")
                    c.execute("UPDATE jobs SET result=? WHERE id=?",
                              (json.dumps({k: ev.get(k) for k in keep}), job_id))
                elif kind == "error":
                    c.execute("UPDATE jobs SET last_error=? WHERE id=?", (str(ev.get("message")), job_id))
            c.execute("UPDATE jobs SET events_offset=?, updated=?" + (", progress=?" if progress else "") + " WHERE id=?",
                      [new_offset, time.time(), *([json.dumps(progress)] if progress else []), job_id])
        return True

    # -- allocations ----------------------------------------------------------------------
    @_guarded
    def add_allocation(self, job_id: int, *, attempt: int, backend: str, backend_id: str, host: str | None,
                       phase: str | None, shape: str | None, log: str | None, info: dict[str, Any]) -> int:
        with self.write() as c:
            cur = c.execute("INSERT INTO allocations (job_id, attempt, backend, backend_id, host, phase, shape, state,"
                            " log, info, started) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (job_id, attempt, backend, backend_id, host, phase, shape, "PENDING", log,
                             json.dumps(info), time.time()))
            self._event(c, job_id, "manager", "launched", attempt=attempt, backend=backend,
                        backend_id=backend_id, log=log)
            return int(cur.lastrowid or 0)

    @_guarded
    def allocations(self, job_id: int | None = None, live: bool = False) -> list[AllocRow]:
        where = [*(["job_id=?"] if job_id is not None else []), *(["ended IS NULL"] if live else [])]
        sql = "SELECT * FROM allocations" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [AllocRow.of(r) for r in self.conn.execute(sql, [job_id] if job_id is not None else [])]

    @_guarded
    def set_allocation_state(self, alloc_id: int, state: str) -> None:
        with self.write() as c:
            c.execute("UPDATE allocations SET state=? WHERE id=? AND ended IS NULL", (state, alloc_id))

    @_guarded
    def end_allocation(self, alloc_id: int, *, state: str, exit_code: int | None, reason: str,
                       job_to: str | None = None, job_reason: str | None = None, **values: Any) -> bool:
        """Record an allocation's end and, in the same transaction, the job's next status.

        Returns False when another manager recorded this end first. The job changes only
        if it is still active (a cancelled job stays cancelled).
        """
        with self.write() as c:
            cur = c.execute("UPDATE allocations SET state=?, exit_code=?, reason=?, ended=? WHERE id=? AND ended IS NULL",
                            (state, exit_code, reason, time.time(), alloc_id))
            if cur.rowcount != 1:
                return False
            job_id = c.execute("SELECT job_id FROM allocations WHERE id=?", (alloc_id,)).fetchone()[0]
            self._event(c, job_id, "manager", "allocation_end", allocation=alloc_id, state=state,
                        exit_code=exit_code, reason=reason)
            if job_to is not None:
                self._transition(c, job_id, job_to, ACTIVE, job_reason, values)
        return True

    # -- events ---------------------------------------------------------------------------
    def _event(self, c: sqlite3.Connection, job_id: int, source: str, kind: str, **data: Any) -> None:
        c.execute("INSERT INTO events (job_id, t, source, kind, data) VALUES (?,?,?,?,?)",
                  (job_id, time.time(), source, kind, json.dumps(data, default=str)))

    @_guarded
    def add_event(self, job_id: int, kind: str, **data: Any) -> None:
        with self.write() as c:
            self._event(c, job_id, "manager", kind, **data)

    @_guarded
    def events(self, job_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE job_id=?" + (" AND kind=?" if kind else "") + " ORDER BY id"
        return [decode_row(r) for r in self.conn.execute(sql, [job_id, *([kind] if kind else [])])]

    # -- notifications --------------------------------------------------------------------
    def _queue_notes(self, c: sqlite3.Connection, job_id: int, notify: Sequence[dict[str, Any]], on_event: str,
                     trigger: str, status: str, reason: str | None) -> None:
        for i, entry in enumerate(notify):
            if trigger not in entry.get("on", ("terminal",)):
                continue
            for kind in ("command", "webhook", "email"):
                if entry.get(kind):
                    c.execute("INSERT OR IGNORE INTO notifications (job_id, on_event, channel, kind, target, status,"
                              " reason) VALUES (?,?,?,?,?,?,?)",
                              (job_id, on_event, f"{i}.{kind}", kind, entry[kind], status, reason))

    @_guarded
    def claim_notes(self, by: str, now: float, limit: int = 100) -> list[NoteRow]:
        """Claim due notifications for delivery (state SENDING, tries + 1) in one transaction."""
        with self.write() as c:
            rows = c.execute("SELECT id, job_id, on_event, channel, kind, target, status, reason, tries "
                             "FROM notifications WHERE state='PENDING' AND next_try<=? ORDER BY id LIMIT ?",
                             (now, limit)).fetchall()
            for r in rows:
                c.execute("UPDATE notifications SET state='SENDING', claimed_by=?, tries=tries+1 WHERE id=?",
                          (by, r["id"]))
        return [NoteRow(**{**dict(zip(r.keys(), r)), "tries": r["tries"] + 1}) for r in rows]

    @_guarded
    def finish_note(self, note_id: int, *, error: str | None = None, retry_at: float | None = None) -> None:
        """Record a delivery: sent (no error), to retry at ``retry_at``, or given up."""
        state = "SENT" if error is None else ("PENDING" if retry_at is not None else "FAILED")
        with self.write() as c:
            c.execute("UPDATE notifications SET state=?, last_error=?, next_try=COALESCE(?, next_try), "
                      "sent=CASE WHEN ?='SENT' THEN ? ELSE sent END WHERE id=?",
                      (state, error, retry_at, state, time.time(), note_id))

    @_guarded
    def notes(self, job_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM notifications" + (" WHERE job_id=?" if job_id is not None else "") + " ORDER BY id"
        return [decode_row(r) for r in self.conn.execute(sql, [] if job_id is None else [job_id])]

    @_guarded
    def idle(self) -> bool:
        """Return whether nothing is left: no NEW or active job, live allocation or pending notification.

        A notification claimed by a manager that died while sending (SENDING) does not count:
        it is not sent twice.
        """
        q = ("SELECT (SELECT COUNT(*) FROM jobs WHERE status IN ('NEW','LAUNCHED','RUNNING','RESCALING'))"
             " + (SELECT COUNT(*) FROM allocations WHERE ended IS NULL)"
             " + (SELECT COUNT(*) FROM notifications WHERE state='PENDING')")
        return int(self.conn.execute(q).fetchone()[0]) == 0


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
