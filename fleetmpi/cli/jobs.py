"""Ledger subcommands: queue, sweep, manager, status, cancel, report.

``status``, ``cancel`` and ``report`` (like ``approve`` and ``events``) take a job dir or a
ledger job id or name; fleetmpi.cli.common.resolve_job decides which.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from fleetmpi.cli.common import JOB_HELP, add_set, resolve_job
from fleetmpi.errors import ExitCode

Handler = Callable[[argparse.Namespace], int]


def add_parsers(sub: Any) -> dict[str, Handler]:
    """Add the ledger subcommands to ``sub`` (argparse subparsers); return their handlers by name."""
    q = sub.add_parser("queue", help="register a job in the ledger (status NEW) for `fleetmpi manager`; returns at once")
    q.add_argument("spec", help="job spec (YAML)")
    add_set(q)
    q.add_argument("--job-dir", help="job directory (default: $FLEETMPI_HOME/jobs/ID-NAME)")
    q.add_argument("--max-queued", type=int, help="refuse if you already have this many NEW jobs (FLEETMPI_MAX_QUEUED)")
    q.add_argument("--json", action="store_true", help="print the job's status record as JSON")

    sw = sub.add_parser("sweep", help="queue one job per point of a parameter grid (cartesian product)")
    sw.add_argument("spec", help="job spec (YAML)")
    sw.add_argument("--grid", action="append", required=True, metavar="KEY.PATH=V1,V2,...",
                    help="values of one spec key (repeatable: the grid is their product)")
    add_set(sw)
    sw.add_argument("--max-queued", type=int, help="as for queue")
    sw.add_argument("--json", action="store_true")

    m = sub.add_parser("manager", help="launch, watch, retry and notify the ledger's jobs (a loop, or --once)")
    m.add_argument("--once", action="store_true", help="run one cycle and exit (cron, scrontab)")
    m.add_argument("--until-idle", action="store_true", help="exit when no job is queued or active")
    m.add_argument("--max-running", type=int, help="active jobs per user (FLEETMPI_MAX_RUNNING, default 4)")
    m.add_argument("--max-queued", type=int, help="NEW jobs per user that queue accepts (FLEETMPI_MAX_QUEUED)")
    m.add_argument("--poll-min-s", type=float, help="poll interval after a change (FLEETMPI_POLL_MIN_S, default 2)")
    m.add_argument("--poll-max-s", type=float, help="longest poll interval when idle (FLEETMPI_POLL_MAX_S, default 60)")
    m.add_argument("--json", action="store_true", help="with --once: print what the cycle did as JSON")

    st = sub.add_parser("status", help="show ledger jobs (all, or one in detail), or a job dir's status")
    st.add_argument("job", nargs="?", help=f"{JOB_HELP} (a job dir: its state and Slurm jobs)")
    st.add_argument("--active", action="store_true", help="only NEW and active jobs")
    st.add_argument("--json", action="store_true")

    c = sub.add_parser("cancel", help="cancel a ledger job (running ranks checkpoint first)")
    c.add_argument("job", help=JOB_HELP)

    r = sub.add_parser("report", help="plot loss, sync bytes per step and ranks over steps to a PNG")
    r.add_argument("job", help=JOB_HELP)
    r.add_argument("--out", required=True, help="output PNG")
    r.add_argument("--json", action="store_true")

    lg = sub.add_parser("ledger", help="maintain the job ledger ($FLEETMPI_HOME/ledger.db)")
    lsub = lg.add_subparsers(dest="ledger_cmd", metavar="ACTION", required=True)
    rb = lsub.add_parser("rebuild", help="rebuild the ledger from the job dirs under $FLEETMPI_HOME/jobs "
                                         "(stop the manager first; the old file is kept aside)")
    rb.add_argument("--json", action="store_true", help="print what was rebuilt as JSON")

    return {"queue": _cmd_queue, "sweep": _cmd_sweep, "manager": _cmd_manager, "status": _cmd_status,
            "cancel": _cmd_cancel, "report": _cmd_report, "ledger": _cmd_ledger}


def _cmd_queue(args: argparse.Namespace) -> int:
    from fleetmpi.api import job_record, queue
    job = queue(args.spec, overrides=args.overrides, job_dir=args.job_dir, max_queued=args.max_queued)
    row = job.row()
    print(f"fleetmpi: queued job {row.id} ({row.name}), status {row.status}; job dir {row.job_dir}", file=sys.stderr)
    print(json.dumps(job_record(row), indent=1) if args.json else row.id)
    return ExitCode.OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fleetmpi.api import job_record, sweep
    jobs = sweep(args.spec, args.grid, overrides=args.overrides, max_queued=args.max_queued)
    rows = [j.row() for j in jobs]
    print(f"fleetmpi: queued {len(rows)} jobs: {', '.join(f'{r.id} {r.name}' for r in rows)}", file=sys.stderr)
    print(json.dumps([job_record(r) for r in rows], indent=1) if args.json else "\n".join(str(r.id) for r in rows))
    return ExitCode.OK


def _cmd_manager(args: argparse.Namespace) -> int:
    from fleetmpi.jobs.ledger import Ledger
    from fleetmpi.jobs.manager import Manager, ManagerConfig
    cfg = ManagerConfig.resolve(max_running=args.max_running, max_queued=args.max_queued,
                                poll_min_s=args.poll_min_s, poll_max_s=args.poll_max_s)
    ledger = Ledger()
    manager = Manager(ledger, cfg)
    if args.once:
        rep = manager.cycle()
        if args.json:
            print(json.dumps({"manager": manager.id, "polls": rep.polls, "polled": rep.polled, "folded": rep.folded,
                              "ended": rep.ended, "launched": rep.launched, "notified": rep.notified,
                              "idle": ledger.idle()}))
        return ExitCode.OK
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    manager.say(f"{manager.id} watching {ledger.path} (max {cfg.max_running} running per user, "
                f"poll {cfg.poll_min_s:g}-{cfg.poll_max_s:g} s)")
    manager.run(until_idle=args.until_idle, stop=lambda: bool(stop["signal"]))
    manager.say("stopped" if stop["signal"] else "idle: nothing queued or active")
    return ExitCode.OK


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _cmd_status(args: argparse.Namespace) -> int:
    from fleetmpi.api import job_record
    from fleetmpi.jobs.ledger import ACTIVE, NEW, Ledger
    from fleetmpi.rules import format_bytes
    if args.job:
        ref = resolve_job(args.job)
        if ref.is_dir:
            from fleetmpi.cli.slurm import job_dir_status
            return job_dir_status(ref.job_dir, args.json)
        job = ref.ledger_row()
        _refresh(Ledger(), [job.id])
        job = Ledger().get(job.id)
        rec = job_record(job)
        from fleetmpi.jobdir import JobDir
        from fleetmpi.jobs.summary import job_summary
        if JobDir(job.job_dir).exists():
            # The ledger's own status, phase and reason stay; the run's facts come under the
            # names run --json and submit --json give them.
            for key, value in job_summary(JobDir(job.job_dir)).items():
                rec.setdefault(key, value)
        allocs = Ledger().allocations(job.id)
        rec["allocations"] = [{"attempt": a.attempt, "backend": a.backend, "backend_id": a.backend_id,
                               "phase": a.phase, "shape": a.shape, "state": a.state, "exit_code": a.exit_code,
                               "start": a.started, "end": a.ended, "reason": a.reason, "log": a.log} for a in allocs]
        from fleetmpi.cli.watch import live, live_lines
        from fleetmpi.jobdir import JobDir
        rec["live"] = live(JobDir(job.job_dir)) if JobDir(job.job_dir).exists() else None
        if args.json:
            print(json.dumps(rec, indent=1))
            return ExitCode.OK
        for extra in live_lines(rec["live"], "RUNNING" if job.status in ACTIVE else job.status) if rec["live"] else []:
            print(extra)
        for key in ("id", "name", "status", "phase", "shape", "step", "epoch", "loss", "valid_loss",
                    "sync_bytes_per_step", "attempts", "failures", "reason", "job_dir"):
            if rec.get(key) is not None:
                print(f"{key:>20}: {rec[key]}")
        print(f"{'age':>20}: {_age(rec['age_s'])}")
        for a in rec["allocations"]:
            when = time.strftime("%H:%M:%S", time.localtime(a["start"]))
            print(f"  attempt {a['attempt']} {a['backend']} {a['backend_id']} {a['shape'] or ''} started {when}: "
                  f"{a['state']}" + (f" exit {a['exit_code']}" if a["exit_code"] is not None else "")
                  + (f" ({a['reason']})" if a["reason"] else ""))
        return ExitCode.OK
    ledger = Ledger.existing()
    if ledger is not None:
        _refresh(ledger)
    rows = [] if ledger is None else ledger.jobs([NEW, *ACTIVE] if args.active else None)
    recs = [job_record(r) for r in rows]
    if args.json:
        print(json.dumps(recs, indent=1))
        return ExitCode.OK
    if not recs:
        print(f"fleetmpi: no {'queued or active ' if args.active else ''}jobs in the ledger", file=sys.stderr)
        return ExitCode.OK
    head = ("ID", "NAME", "STATUS", "PHASE", "SHAPE", "STEP", "EPOCH", "LOSS", "SYNC/STEP", "ATT", "AGE")
    table = [head] + [(str(r["id"]), r["name"], r["status"], r["phase"] or "-", r["shape"] or "-",
                       _num(r["step"], "d"), _num(r["epoch"], ".2f"), _num(r["loss"], ".4g"),
                       "-" if r["sync_bytes_per_step"] is None else format_bytes(r["sync_bytes_per_step"]),
                       str(r["attempts"]), _age(r["age_s"])) for r in recs]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table))
    return ExitCode.OK


def _refresh(ledger: Any, job_ids: list[int] | None = None) -> None:
    """Poll the live allocations once (no launches), so jobs started by `run`/`submit` show how they ended."""
    from fleetmpi.jobs.manager import Manager
    Manager(ledger, out=None).refresh(job_ids)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from fleetmpi.jobs.ledger import Ledger
    from fleetmpi.jobs.manager import cancel_job
    row = resolve_job(args.job).ledger_row()
    ledger = Ledger()
    job = cancel_job(ledger, row.id)
    live = ledger.allocations(job.id, live=True)
    print(f"fleetmpi: job {job.id} ({job.name}) CANCELLED"
          + (f"; SIGTERM sent to {len(live)} allocation(s), its ranks checkpoint and stop" if live else ""),
          file=sys.stderr)
    return ExitCode.OK


def _cmd_report(args: argparse.Namespace) -> int:
    from fleetmpi.jobdir import JobDir
    from fleetmpi.jobs.report import write
    ref = resolve_job(args.job)
    jd = JobDir(ref.job_dir)
    jd.read_state()  # a clear error if this is no job dir
    title = args.job if ref.is_dir or ref.row is None else f"job {args.job}: {jd.root.name}"
    info = write(jd, args.out, title)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"fleetmpi: wrote {info['out']} ({info['axes']} panels, {info['phases']} phase(s), "
              f"{info['bytes']} bytes)", file=sys.stderr)
    return ExitCode.OK


def _cmd_ledger(args: argparse.Namespace) -> int:
    from fleetmpi.jobs.ledger import home
    from fleetmpi.jobs.rebuild import rebuild_from_job_dirs
    summary = rebuild_from_job_dirs(home())
    by_status: dict[str, int] = {}
    for j in summary["jobs"]:
        by_status[j["status"]] = by_status.get(j["status"], 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
    aside = f"; the old file is kept as {summary['kept_aside']}" if summary.get("kept_aside") else ""
    skipped = f"; skipped {len(summary['skipped'])} folder(s) (see --json)" if summary["skipped"] else ""
    print(f"fleetmpi: rebuilt {summary['ledger']} from {len(summary['jobs'])} job dir(s) ({counts}){aside}{skipped}",
          file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    return ExitCode.OK
