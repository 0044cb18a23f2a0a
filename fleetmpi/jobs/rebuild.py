"""Rebuild a lost or damaged job ledger from the job dirs under ``$FLEETMPI_HOME/jobs``.

``fleetmpi ledger rebuild`` runs :func:`rebuild_from_job_dirs`: each job dir
``jobs/<id>-<name>`` gives back its jobs row (id, name, status, phase, attempts, result)
and its events; active jobs are requeued so their next launch resumes from the newest
checkpoint. The new ledger replaces the old file atomically and the old one is kept aside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import pwd
import re
import time
from pathlib import Path
from typing import Any

import yaml

from fleetmpi.errors import BadInput, one_line
from fleetmpi.jobdir import JobDir, fsync_dir, make_dirs, read_lines
from fleetmpi.jobs.ledger import _DIR_ID, CANCELLED, COMPLETED, FAILED, HOME_MODE, NEW, TERMINAL, fsync_file, home
from fleetmpi.jobs.rows import connect, migrate


def _owner_of(path: Path) -> str:
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return getpass.getuser()


def _recover_job(root: Path, job_id: int, now: float) -> dict[str, Any]:
    """Return the jobs row of job dir ``root`` and its events, as well as they can be recovered."""
    from fleetmpi import spec as specmod
    jd = JobDir(root)
    state = jd.read_state()
    text = jd.spec.read_text()
    raw = yaml.safe_load(text)
    raw = raw if isinstance(raw, dict) else {}
    try:
        sp = specmod.load(jd.spec)
        spec_hash, notify = sp.spec_hash(), [
            {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(n).items()} for n in sp.notify]
        max_attempts, backoff_s = sp.retry.max_attempts, sp.retry.backoff_s
    except (BadInput, OSError, ValueError, TypeError):
        # The spec no longer loads (its data moved): keep what the YAML says.
        retry = raw.get("retry")
        retry = retry if isinstance(retry, dict) else {}
        spec_hash, notify = hashlib.sha256(text.encode()).hexdigest(), []
        max_attempts, backoff_s = int(retry.get("max_attempts", 3)), float(retry.get("backoff_s", 30.0))
    events = list(read_lines(jd.events))
    kinds = [str(e.get("event")) for e in events]
    starts = [e for e in events if e.get("event") == "phase_start"]
    goals = [e for e in events if e.get("event") == "goal"]
    found = str(state.get("status", "NEW"))
    reason = state.get("reason")
    if found in (COMPLETED, FAILED):
        status = found
    elif "cancel_requested" in kinds:
        status, reason = CANCELLED, reason or "cancelled by the user"
    else:
        # Allocations died with the old ledger: requeue, and the next launch resumes from
        # the newest checkpoint (`fleetmpi run` on an existing job dir does that).
        status = NEW
        if found != NEW:
            reason = f"ledger rebuilt while the job dir said {found}; requeued to resume from its newest checkpoint"
    attempts = [int(m.group(1)) for m in (re.match(r"manager-attempt-(\d+)\.log$", f.name)
                                          for f in jd.logs.glob("manager-attempt-*.log")) if m]
    created = float(state.get("created") or (events[0].get("t") if events else None) or now)
    goal: dict[str, Any] = goals[-1] if goals else {}
    keep = ("step", "epoch", "reason", "loss", "valid_loss", "model")
    row = {
        "id": job_id, "name": str(raw.get("name") or _DIR_ID.sub("", root.name)), "owner": _owner_of(root),
        "spec_path": str(jd.spec), "spec_hash": spec_hash, "job_dir": str(root.resolve()),
        "backend": str(state.get("backend") or "local"), "status": status,
        "phase": state.get("phase"), "shape": starts[-1].get("shape") if starts else None,
        "attempts": max(attempts, default=0 if status == NEW and not starts else 1), "failures": 0,
        "max_attempts": max_attempts, "backoff_s": backoff_s, "created": created, "updated": now,
        "started": starts[0].get("t") if starts else None,
        "ended": (float(events[-1].get("t") or now) if events else now) if status in TERMINAL else None,
        "last_error": reason if status != COMPLETED else None,
        "events_offset": jd.events.stat().st_size if jd.events.exists() else 0,
        "notify": json.dumps(notify), "result": json.dumps({k: goal.get(k) for k in keep}) if goals else None,
    }
    return {"row": row, "events": events, "found": found}


def rebuild_from_job_dirs(home_dir: Path | str | None = None) -> dict[str, Any]:
    """Write a new ledger from the job dirs in ``home_dir/jobs`` (ids from their names); return a summary.

    Each job comes back with its id, name, status, phase, attempts and result and its
    job-dir events; allocations and notifications are not recoverable. Jobs that were
    active are requeued (NEW). The new file replaces ``ledger.db`` atomically; the old one
    (and its -wal, -shm) is kept as ``ledger.db.corrupt-<time>``. Stop the manager first.
    Job dirs made with ``--job-dir`` elsewhere are not found (queue them again).
    """
    home_dir = Path(home_dir) if home_dir is not None else home()
    make_dirs(home_dir, HOME_MODE)
    db = home_dir / "ledger.db"
    now = time.time()
    recovered: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    jobs_dir = home_dir / "jobs"
    roots = sorted((int(m.group(1)), p) for p in (jobs_dir.iterdir() if jobs_dir.is_dir() else ())
                   if (m := _DIR_ID.match(p.name)) and p.is_dir())
    taken: set[int] = set()
    for job_id, root in roots:
        if job_id in taken:
            skipped.append({"job_dir": str(root), "reason": f"id {job_id} is taken by another job dir"})
            continue
        try:
            recovered.append(_recover_job(root, job_id, now))
            taken.add(job_id)
        except (BadInput, OSError, ValueError, yaml.YAMLError) as e:
            skipped.append({"job_dir": str(root), "reason": one_line(e)})
    tmp = home_dir / f".ledger.db.rebuild.{os.getpid()}"
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    conn = connect(tmp, check=False)
    try:
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        for rec in recovered:
            row = rec["row"]
            conn.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            for ev in rec["events"]:
                conn.execute("INSERT INTO events (job_id, t, source, kind, data) VALUES (?,?,?,?,?)",
                             (row["id"], float(ev.get("t") or now), "job", str(ev.get("event", "?")), json.dumps(ev)))
            conn.execute("INSERT INTO events (job_id, t, source, kind, data) VALUES (?,?,?,?,?)",
                         (row["id"], now, "manager", "rebuilt", json.dumps({"job_dir_status": rec["found"]})))
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to rename into place
    finally:
        conn.close()
    fsync_file(tmp)
    kept = None
    if db.exists() or db.is_symlink():
        kept = home_dir / f"ledger.db.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(db, kept)
        # A -wal left beside the new file would be replayed into it: it goes with the old one.
        for suffix in ("-wal", "-shm"):
            if Path(f"{db}{suffix}").exists():
                os.replace(f"{db}{suffix}", f"{kept}{suffix}")
    os.replace(tmp, db)
    fsync_dir(home_dir)
    jobs = [{k: r["row"][k] for k in ("id", "name", "status", "attempts", "job_dir")} for r in recovered]
    return {"ledger": str(db), "kept_aside": str(kept) if kept else None, "jobs": jobs, "skipped": skipped,
            "counts": {st: sum(1 for j in jobs if j["status"] == st) for st in sorted({j["status"] for j in jobs})}}
