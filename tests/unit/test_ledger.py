"""The SQLite ledger: transition table, compare-and-set claims, folding, notifications, migrations."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fleetmpi.errors import BadInput
from fleetmpi.jobs.ledger import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    FAILED,
    LAUNCHED,
    NEW,
    RESCALING,
    RUNNING,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobNotFound,
    Ledger,
    LedgerDamaged,
    QueueFull,
    check_transition,
)
from fleetmpi.jobs.rows import SCHEMA_VERSION, connect, migrate


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEETMPI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def add(ledger: Ledger, tmp: Path, name: str = "j", notify: list | None = None, owner: str = "alice",
        max_queued: int | None = None) -> int:
    """Register a job whose dir is a plain folder (these tests never launch it)."""
    def make_dir(job_id: int) -> str:
        d = tmp / f"job-{job_id}"
        d.mkdir()
        return str(d)
    return ledger.add_job(name=name, spec_path="s.yaml", spec_hash="h", backend="local", phase="one", shape="1x1",
                          max_attempts=3, backoff_s=0.0, notify=notify or [], make_dir=make_dir, owner=owner,
                          max_queued=max_queued)


def test_default_path_is_fleetmpi_home(_home: Path) -> None:
    ledger = Ledger()
    assert ledger.path == _home / "ledger.db"
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_transition_table_is_enforced_for_every_pair() -> None:
    for frm in TRANSITIONS:
        for to in TRANSITIONS:
            if to in TRANSITIONS[frm]:
                check_transition(frm, to)
            else:
                with pytest.raises(IllegalTransition):
                    check_transition(frm, to)
    assert all(not TRANSITIONS[t] for t in TERMINAL)
    with pytest.raises(IllegalTransition, match="unknown job status"):
        check_transition(NEW, "PAUSED")


def test_illegal_transition_raises_and_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    with pytest.raises(IllegalTransition, match="NEW -> RUNNING is not allowed"):
        ledger.transition(job, RUNNING)
    assert ledger.get(job).status == NEW
    assert ledger.claim(job, "m1", now=1e12)
    assert ledger.transition(job, RUNNING)
    assert ledger.transition(job, COMPLETED)
    for to in (RUNNING, NEW, FAILED, CANCELLED):
        with pytest.raises(IllegalTransition):
            ledger.transition(job, to)
    assert ledger.get(job).status == COMPLETED
    with pytest.raises(ValueError, match="cannot set"):
        add_job = add(ledger, tmp_path)
        ledger.claim(add_job, "m1", now=1e12)
        ledger.transition(add_job, RUNNING, job_dir="/elsewhere")


def test_transition_is_compare_and_set(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    ledger.claim(job, "m1", now=1e12)
    assert ledger.transition(job, CANCELLED, expect=[NEW, *ACTIVE])
    # A manager that decided FAILED on an active job loses to the cancellation: no change, no error.
    assert not ledger.transition(job, FAILED, expect=ACTIVE)
    assert ledger.get(job).status == CANCELLED


def test_claim_once_and_within_max_running(tmp_path: Path) -> None:
    ledger = Ledger()
    jobs = [add(ledger, tmp_path) for _ in range(3)]
    assert ledger.claim(jobs[0], "m1", now=1e12, max_running=2)
    assert not ledger.claim(jobs[0], "m2", now=1e12, max_running=2)  # already claimed
    assert ledger.claim(jobs[1], "m2", now=1e12, max_running=2)
    assert not ledger.claim(jobs[2], "m1", now=1e12, max_running=2)  # the owner's limit
    assert ledger.get(jobs[0]).attempts == 1 and ledger.get(jobs[0]).claimed_by == "m1"
    assert [e["kind"] for e in ledger.events(jobs[0])].count("claimed") == 1
    other = add(ledger, tmp_path, owner="bob")
    assert ledger.claim(other, "m1", now=1e12, max_running=2)  # limits are per owner


def test_retry_wait_holds_a_job_until_not_before(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    ledger.claim(job, "m", now=1e12)
    assert ledger.transition(job, NEW, expect=ACTIVE, reason="node failed", failures=1, not_before=2e12)
    assert ledger.launchable(now=1.5e12) == []
    assert not ledger.claim(job, "m", now=1.5e12)
    assert [j.id for j in ledger.launchable(now=2e12)] == [job]
    assert ledger.claim(job, "m", now=2e12) and ledger.get(job).attempts == 2


def _claim_all(args: tuple[str, str, list[int]]) -> list[int]:
    path, who, ids = args
    ledger = Ledger(path)
    return [i for i in ids if ledger.claim(i, who, now=1e12)]


def test_claims_from_racing_processes_never_overlap(tmp_path: Path) -> None:
    ledger = Ledger()
    ids = [add(ledger, tmp_path) for _ in range(40)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        won = pool.map(_claim_all, [(str(ledger.path), f"m{i}", ids) for i in range(4)])
        # Let the workers end on the pool's own sentinel: leaving it to __exit__'s terminate()
        # (SIGTERM) races the sentinels and depends on the signal disposition they inherited.
        pool.close()
        pool.join()
    flat = [i for w in won for i in w]
    assert sorted(flat) == ids  # each job claimed exactly once, by one of the four
    assert all(ledger.get(i).attempts == 1 for i in ids)


def test_fold_is_once_per_offset_and_drives_status(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path, notify=[{"command": "true", "on": ["terminal", "rescale"]}])
    ledger.claim(job, "m", now=1e12)
    evs = [{"t": 1.0, "event": "phase_start", "phase": "one", "shape": "1x1"},
           {"t": 2.0, "event": "rescale", "from": "one", "to": "two", "to_ranks": 2, "step": 10, "shape": "1x2"}]
    assert ledger.fold(job, 0, 100, evs)
    assert not ledger.fold(job, 0, 100, evs)  # a second manager with the same offset folds nothing
    row = ledger.get(job)
    assert (row.status, row.phase, row.shape, row.events_offset) == (RESCALING, "two", "1x2", 100)
    assert len(ledger.events(job, "rescale")) == 1
    assert ledger.fold(job, 100, 150, [{"t": 3.0, "event": "phase_start", "phase": "two", "shape": "1x2"},
                                       {"t": 4.0, "event": "goal", "step": 20, "loss": 0.5, "model": "m.h5"}])
    row = ledger.get(job)
    assert row.status == RUNNING and row.result["model"] == "m.h5" and row.started == 1.0
    notes = ledger.notes(job)
    assert [(n["on_event"], n["status"]) for n in notes] == [("rescale@10", "RESCALING")]


def test_terminal_status_queues_each_notification_once(tmp_path: Path) -> None:
    ledger = Ledger()
    notify = [{"command": "echo {job}", "webhook": "http://127.0.0.1:9/x", "on": ["terminal"]},
              {"email": "a@b.c", "on": ["rescale"]}]
    job = add(ledger, tmp_path, notify=notify)
    ledger.claim(job, "m", now=1e12)
    assert ledger.transition(job, FAILED, expect=ACTIVE, reason="exit 1")
    assert not ledger.transition(job, FAILED, expect=ACTIVE)  # the other manager's try
    assert sorted(n["kind"] for n in ledger.notes(job)) == ["command", "webhook"]
    first = ledger.claim_notes("m1", now=1e12)
    assert sorted(n.kind for n in first) == ["command", "webhook"] and all(n.tries == 1 for n in first)
    assert ledger.claim_notes("m2", now=1e12) == []  # claimed: nobody else sends them
    ledger.finish_note(first[0].id)
    ledger.finish_note(first[1].id, error="refused", retry_at=5e12)
    assert ledger.claim_notes("m2", now=1e12) == []
    again = ledger.claim_notes("m2", now=5e12)
    assert [n.id for n in again] == [first[1].id] and again[0].tries == 2
    ledger.finish_note(again[0].id, error="refused")
    assert {n["state"] for n in ledger.notes(job)} == {"SENT", "FAILED"}
    assert ledger.idle()


def test_queue_limit_and_lookup(tmp_path: Path) -> None:
    ledger = Ledger()
    a = add(ledger, tmp_path, name="alpha", max_queued=2)
    add(ledger, tmp_path, name="beta", max_queued=2)
    with pytest.raises(QueueFull, match=r"limit .* is 2"):
        add(ledger, tmp_path, name="gamma", max_queued=2)
    assert len(ledger.jobs()) == 2 and not (tmp_path / "job-3").exists()
    assert ledger.find("alpha").id == a and ledger.find(str(a)).name == "alpha"
    add(ledger, tmp_path, name="alpha")
    with pytest.raises(BadInput, match="ambiguous"):
        ledger.find("alpha")
    with pytest.raises(JobNotFound):
        ledger.find("nope")


def test_migration_from_version_1_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = connect(path)
    assert migrate(conn, target=1) == 0
    conn.execute("INSERT INTO jobs (name, owner, spec_path, spec_hash, job_dir, backend, status, max_attempts,"
                 " backoff_s, created, updated) VALUES ('old', 'alice', 's.yaml', 'h', '/d', 'local', 'RUNNING',"
                 " 3, 30, 1, 1)")
    conn.execute("INSERT INTO allocations (job_id, attempt, backend, backend_id, state, started)"
                 " VALUES (1, 1, 'local', 'vm:1', 'RUNNING', 1)")
    conn.close()
    ledger = Ledger(path)
    assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    job = ledger.get(1)
    assert (job.name, job.status, job.notify, job.progress, job.result) == ("old", RUNNING, [], {}, None)
    assert ledger.allocations(1, live=True)[0].backend_id == "vm:1"
    assert ledger.transition(1, COMPLETED, expect=ACTIVE) and ledger.notes(1) == []
    indexes = {r[0] for r in ledger.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"jobs_status", "allocations_live"} <= indexes
    ledger.close()
    assert migrate(connect(path)) == SCHEMA_VERSION  # idempotent


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(BadInput, match="newer than this fleetmpi knows"):
        Ledger(path)


def test_launched_is_active() -> None:
    assert LAUNCHED in ACTIVE and NEW not in ACTIVE and not ACTIVE & TERMINAL


def test_backup_is_private_restorable_and_rolls(tmp_path: Path, _home: Path) -> None:
    rng = np.random.default_rng(5)
    names = [f"job{int(x)}" for x in rng.integers(0, 10**6, 3)]
    ledger = Ledger()
    ids = [add(ledger, tmp_path, name=n) for n in names]
    folder = _home / "backups"
    folder.mkdir()
    for old in ("20000101-000000", "20000101-000001", "20000101-000002"):
        (folder / f"ledger-{old}.db").write_bytes(b"old")
    dest = ledger.backup(keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["ledger-20000101-000002.db", dest.name]
    assert dest.stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700
    assert _home.stat().st_mode & 0o777 == 0o700 and ledger.path.stat().st_mode & 0o777 == 0o600
    copy = Ledger(dest)
    assert [(j.id, j.name) for j in copy.jobs()] == list(zip(ids, names))
    with pytest.raises(ValueError, match="keep=0"):
        ledger.backup(keep=0)


def test_garbage_file_is_damage_with_the_way_to_recover(tmp_path: Path, _home: Path) -> None:
    _home.mkdir()
    (_home / "ledger.db").write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LedgerDamaged, match=r"not an SQLite file.*no backup exists.*fleetmpi ledger rebuild"):
        Ledger()


def test_row_of_the_wrong_type_is_damage(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    ledger.conn.execute("UPDATE jobs SET attempts='x' WHERE id=?", (job,))
    with pytest.raises(LedgerDamaged, match="column 'attempts' holds 'x'"):
        ledger.jobs()
    ledger.conn.execute("UPDATE jobs SET attempts=0, notify='[{' WHERE id=?", (job,))
    with pytest.raises(LedgerDamaged, match=r"column 'notify' of row .* is not JSON"):
        ledger.get(job)


def test_flipped_byte_in_the_schema_text_is_damage_at_open(tmp_path: Path) -> None:
    # A renamed column passes quick_check (pages are intact) and would fail only at the first
    # query that names it: the manager could launch jobs before finding the damage.
    ledger = Ledger()
    add(ledger, tmp_path)
    ledger.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger.close()
    raw = ledger.path.read_bytes()
    assert raw.count(b"target TEXT") == 1
    ledger.path.write_bytes(raw.replace(b"target TEXT", b"targex TEXT"))
    with pytest.raises(LedgerDamaged, match=r"schema: notifications not as fleetmpi wrote it.*ledger rebuild"):
        Ledger()
    ledger.path.write_bytes(raw)
    assert len(Ledger().jobs()) == 1


def test_empty_file_is_a_new_ledger_only_without_job_dirs(_home: Path) -> None:
    _home.mkdir()
    (_home / "ledger.db").write_bytes(b"")
    Ledger().close()
    (_home / "ledger.db").write_bytes(b"")
    (_home / "jobs" / "000004-x").mkdir(parents=True)
    with pytest.raises(LedgerDamaged, match="file is empty but 1 job dirs exist, ids 4 to 4"):
        Ledger()


def test_ids_never_reuse_an_existing_job_dir(tmp_path: Path, _home: Path) -> None:
    taken = int(np.random.default_rng(9).integers(2, 500))
    ledger = Ledger()
    assert add(ledger, tmp_path) == 1
    (_home / "jobs" / f"{taken:06d}-other").mkdir(parents=True)
    assert add(ledger, tmp_path) == taken + 1
    assert add(ledger, tmp_path) == taken + 2


def test_a_pending_approval_goes_through_the_notifiers_with_the_approve_command(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path, notify=[{"command": "true", "on": ["approval"]}, {"email": "a@b.c"}])
    ledger.claim(job, "m", now=1e12)
    ev = {"t": 2.0, "event": "approval_pending", "id": "one-40-r0", "goto": "two", "rule": 0, "step": 40}
    assert ledger.fold(job, 0, 100, [{"t": 1.0, "event": "phase_start", "phase": "one", "shape": "1x1"}, ev])
    notes = ledger.notes(job)
    assert [(n["on_event"], n["kind"], n["status"]) for n in notes] == [("approval@one-40-r0", "command",
                                                                         "APPROVAL_PENDING")]
    assert notes[0]["reason"] == (f"rule 0 wants a rescale one -> two at step 40; training goes on in phase one "
                                  f"until approved: fleetmpi approve {ledger.get(job).job_dir}")


def test_reopen_continues_an_ended_row_and_nothing_else(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    assert not ledger.reopen(job, "fleetmpi run", now=1.0)          # NEW is not ended
    assert ledger.claim(job, "m1", now=1e12)
    assert ledger.transition(job, "RUNNING") and ledger.transition(job, "COMPLETED")
    assert ledger.reopen(job, "fleetmpi run", now=2.0)              # a rerun of its job dir
    row = ledger.get(job)
    assert (row.status, row.attempts, row.claimed_by) == ("LAUNCHED", 2, "fleetmpi run")
    assert not ledger.reopen(job, "fleetmpi run", now=3.0)          # LAUNCHED is not ended
    assert [e["kind"] for e in ledger.events(job)].count("reopened") == 1


def test_a_broken_constraint_is_not_reported_as_damage(tmp_path: Path) -> None:
    ledger = Ledger()
    job = add(ledger, tmp_path)
    with pytest.raises(sqlite3.IntegrityError):
        ledger.add_job(name="again", spec_path="s.yaml", spec_hash="h", backend="local", phase="one", shape="1x1",
                       max_attempts=3, backoff_s=0.0, notify=[], make_dir=lambda _id: ledger.get(job).job_dir)
