"""Slurm subcommands: ``submit``, and the status of a job dir (which ``status`` prints).

``fleetmpi submit SPEC --backend slurm [--wait] [--json]`` creates the job dir exactly as
``fleetmpi run`` does, checks every phase's shape with Slurm, and submits the start phase;
the job then resubmits itself through rescales and signals. With ``--wait`` it follows
the chain of Slurm jobs and exits with the training's final code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetmpi.cli.common import add_set
from fleetmpi.errors import BadInput, ExitCode

Handler = Callable[[argparse.Namespace], int]


def add_parsers(sub: Any) -> dict[str, Handler]:
    """Add ``submit`` to ``sub`` (argparse subparsers); return its handler by name."""
    s = sub.add_parser("submit", help="submit a job to Slurm; it resubmits itself through rescales to its goal")
    s.add_argument("spec", help="job spec (YAML), or an existing job dir to submit again from its checkpoint")
    s.add_argument("--backend", choices=["slurm"], help="override scheduler.backend (default: the spec's)")
    s.add_argument("--job-dir", help="job directory (default: ./runs/NAME, NAME from the spec)")
    add_set(s, "scheduler.account=proj")
    # sbatch's own spellings. Partition and time fill in every phase that does not set its
    # own; account and qos are the scheduler section's (one per job), as --set would set them.
    s.add_argument("-p", "--partition", help="partition of every phase that sets none (sbatch -p)")
    s.add_argument("-A", "--account", help="account to charge (scheduler.account; sbatch -A)")
    s.add_argument("-t", "--time", metavar="TIME", help="time limit of every phase that sets no time_min: minutes "
                   "or Slurm's formats, e.g. 90, 01:30:00, 1-00:00 (sbatch -t)")
    s.add_argument("-q", "--qos", help="quality of service (scheduler.qos; sbatch -q)")
    s.add_argument("--wait", action="store_true",
                   help="follow the chain of Slurm jobs; exit with the training's final code")
    s.add_argument("--detach-on-exit", action="store_true",
                   help="with --wait: SIGTERM/SIGINT end only this follower and leave the Slurm job running "
                        "(default: cancel the chain; the ranks checkpoint and it exits 4)")
    s.add_argument("--json", action="store_true", help="print the chain (job ids, phases, shapes, exit codes)")
    return {"submit": _cmd_submit}


def _preflight(spec: Any, jd: Any) -> None:
    from fleetmpi.launch.slurm.backend import SlurmBackend
    if spec.scheduler.backend != "slurm":
        raise BadInput(f"submit: scheduler.backend is {spec.scheduler.backend!r}; pass --backend slurm or set "
                       "scheduler: {backend: slurm} in the spec (`fleetmpi run` runs a job on this machine)")
    SlurmBackend(jd, spec).preflight()


def _cmd_submit(args: argparse.Namespace) -> int:
    from fleetmpi.cli.train import open_job
    from fleetmpi.jobs.summary import job_summary
    from fleetmpi.launch.slurm.backend import SlurmBackend
    from fleetmpi.launch.slurm.chain import runs
    from fleetmpi.launch.slurm.cmd import ACTIVE_STATES, squeue_states
    from fleetmpi.launch.slurm.submit import SubmissionError, release

    given = Path(args.spec)
    overrides = list(args.overrides) + sbatch_shortcuts(args, given)
    if args.backend and not given.is_dir():
        overrides.append(f"scheduler.backend={args.backend}")
    jd, spec = open_job(given, args.job_dir, overrides, "submit", _preflight)
    if spec.scheduler.backend != "slurm":
        raise BadInput(f"{jd.root}: this job's scheduler.backend is {spec.scheduler.backend!r}; "
                       f"`fleetmpi run {jd.root}` resumes it on this machine")
    state = jd.read_state()
    backend = SlurmBackend(jd, spec)
    chain, end = runs(jd)
    rc: int | None = None
    if state.get("status") == "COMPLETED":
        print(f"fleetmpi: {jd.root} already completed ({state.get('reason', 'goal')}); model: {jd.model}",
              file=sys.stderr)
        rc = int((state.get("outcome") or {}).get("exit_code", ExitCode.OK))
    elif chain and end is None and squeue_states([chain[-1]["job_id"]]).get(chain[-1]["job_id"]) in ACTIVE_STATES:
        jid = chain[-1]["job_id"]
        # A submitter that died between sbatch and release left it held: release it now.
        release(jid, shape=f"Slurm job {jid}", attempts=spec.scheduler.submit_attempts,
                backoff_s=spec.scheduler.submit_backoff_s)
        print(f"fleetmpi: {jd.root} already has Slurm job {jid} in the queue; not submitting another",
              file=sys.stderr)
    else:
        phase = state.get("phase")
        if not isinstance(phase, str) or phase not in spec.fleet.phases:
            raise BadInput(f"{jd.state_path}: phase {phase!r} is not in the spec's fleet.phases "
                           f"({', '.join(spec.fleet.phases)}); the file was edited or belongs to another job")
        if chain:
            # A person asked again after the chain stopped (or its last job vanished): the
            # caps on stops start afresh.
            jd.event("resume_requested", status=state.get("status"))
            jd.update_state(slurm_timeouts=0, slurm_preemptions=0)
        try:
            job_id = backend.submit(phase, by="resume" if chain else "submit")
        except SubmissionError as e:
            jd.update_state(status="FAILED", reason=f"submission failed: {e}")
            raise
        _register(jd, spec, job_id, len(chain))
        if not args.json:
            print(job_id)
    if args.wait and rc is None:
        rc = backend.follow(cancel_on_signal=not args.detach_on_exit)
        _settle(jd)
    if args.json:
        print(json.dumps(job_summary(jd, rc), indent=1, allow_nan=False))
    return ExitCode.OK if rc is None else rc


def _register(jd: Any, spec: Any, job_id: str, chain_from: int) -> None:
    """Record the chain in the ledger as one allocation (as the manager's SlurmJobs does), so `status` lists it."""
    from fleetmpi.api import register_started
    seen = register_started(jd, spec, backend="slurm", backend_id=job_id, log=str(jd.logs / f"slurm-{job_id}.out"),
                            info={"job_dir": str(jd.root.resolve()), "chain_from": chain_from}, by="fleetmpi submit")
    if seen is not None:
        seen[0].close()


def _settle(jd: Any) -> None:
    """After following the chain: let the ledger record its end now rather than at the next `status`."""
    import sqlite3

    from fleetmpi.errors import FleetError
    from fleetmpi.jobs.ledger import Ledger
    from fleetmpi.jobs.manager import Manager
    try:
        ledger = Ledger.existing()
        if ledger is not None:
            Manager(ledger, out=None).refresh()
            ledger.close()
    except (OSError, sqlite3.Error, FleetError):
        pass   # the ledger is a listing; `fleetmpi status` records the end on its next look


def sbatch_shortcuts(args: argparse.Namespace, given: Path) -> list[str]:
    """Return ``--set`` overrides for submit's -p/-A/-t/-q (partition and time only where a phase sets none)."""
    from fleetmpi import spec as specmod
    named = {flag: v for flag, v in (("-p/--partition", args.partition), ("-A/--account", args.account),
                                     ("-t/--time", args.time), ("-q/--qos", args.qos)) if v is not None}
    if not named:
        return []
    if given.is_dir():
        raise BadInput(f"submit {given}: {', '.join(named)} apply when a job is created, and this job dir exists; "
                       "start a new --job-dir, or submit it again without them")
    if args.time is not None:
        try:
            specmod.slurm_minutes(args.time)
        except ValueError as e:
            raise BadInput(f"submit -t/--time {args.time!r}: {e}") from None
    # json.dumps quotes each value, so YAML keeps '1:30' a string (it would read it as 90).
    out = [f"scheduler.{key}={json.dumps(v)}" for key, v in (("account", args.account), ("qos", args.qos))
           if v is not None]
    spec = specmod.load(given, [*args.overrides, *out])
    for name, phase in spec.fleet.phases.items():
        if args.partition is not None and phase.partition is None:
            out.append(f"fleet.phases.{name}.partition={json.dumps(args.partition)}")
        if args.time is not None and phase.time_min is None:
            out.append(f"fleet.phases.{name}.time_min={json.dumps(args.time)}")
    return out


def job_dir_status(job_dir: Path, as_json: bool) -> int:
    """Print a job dir's status (state, Slurm jobs, exit codes), whatever its backend; return 0."""
    from fleetmpi.jobdir import JobDir
    from fleetmpi.jobs.summary import job_summary

    jd = JobDir(job_dir)
    if not jd.exists():
        raise BadInput(f"{jd.root}: not a fleetmpi job dir (no spec.yaml and state.json)")
    from fleetmpi.cli.watch import live, live_lines
    info = job_summary(jd)
    info["live"] = live(jd)
    if as_json:
        print(json.dumps(info, indent=1, allow_nan=False))
        return ExitCode.OK
    line = f"{jd.root}: {info['status']}, phase {info['phase']}"
    if info.get("reason"):
        line += f" ({info['reason']})"
    if info["exit_code"] is not None:
        line += f"; final exit code {info['exit_code']}"
    print(line)
    for extra in live_lines(info["live"], info["status"]):
        print(extra)
    if info["chain"]:
        print(f"  {'job':>8} {'run':>3}  {'phase':<12} {'shape':<16} {'by':<10} {'state':<12} {'exit':>4}  nodes")
    for r in info["chain"]:
        code = "-" if r.get("exit_code") is None else str(r["exit_code"])
        nodes = (r.get("allocation") or {}).get("nodelist") or "-"
        print(f"  {r['job_id'] or '-':>8} {r.get('restart', 0):>3}  {r['phase'] or '-':<12} {r['shape'] or '-':<16} "
              f"{r['by'] or '-':<10} {r['state']:<12} {code:>4}  {nodes}")
    if info["timeouts"] or info["preemptions"]:
        print(f"  stops: {info['timeouts']} near the time limit, {info['preemptions']} other (preemption)")
    return ExitCode.OK
