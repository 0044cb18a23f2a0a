"""Slurm batch side: what the script of one phase runs inside its allocation.

``python -m fleetmpi.launch.slurm.batch begin|continue JOB_DIR`` (called by the script from
:mod:`.script`): ``begin`` records the allocation; ``continue`` reads the phase's exit code
and submits the next phase (rescale, exit 3; rank 0 usually submitted it already, once the
rescale's checkpoint was committed: :func:`submit_ahead`) or the same phase again (stopped by a signal,
exit 4: near the time limit or preempted, each with its own cap), or ends the chain; where
Slurm already ended the job as lost (NODE_FAIL...) it does neither and leaves the retry to
the manager.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from fleetmpi.errors import BadInput, ExitCode
from fleetmpi.jobdir import JobDir
from fleetmpi.launch.slurm import chain as chain_mod
from fleetmpi.launch.slurm.chain import record, runs, sync_state
from fleetmpi.launch.slurm.cmd import LOST_STATES, SlurmCommandError, run_slurm, squeue_states
from fleetmpi.launch.slurm.script import MPI_INIT_DEADLINE_ENV
from fleetmpi.launch.slurm.submit import SubmissionError, cancel, requeue
from fleetmpi.lock import JobDirBusy, JobLock

if TYPE_CHECKING:
    # backend and spec load yaml and the sbatch renderer: `begin`, on every phase's
    # critical path, needs neither, so only `continue` (and rank 0's submit_ahead) import them.
    from fleetmpi.spec import Spec

# Slack on top of the signal grace when telling a time-limit stop from a preemption:
# Slurm checks for due signals about once a minute at worst.
_TIMEOUT_SLACK_S = 60.0
# What srun (or mpiexec's hydra) sets for a step and its tasks beyond the batch shell's environment.
_TASK_VARS = ("PMI_", "PMI2_", "PMIX_", "SLURM_STEP", "SLURM_SRUN_COMM_", "SLURM_LAUNCH_NODE_IPADDR",
              "SLURM_DISTRIBUTION", "SLURM_MPI_TYPE", "SLURM_UMASK", "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP",
              "SRUN_DEBUG", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "HYDI_", "HYDRA_")
# How long `begin` waits for the job dir's lock: the allocation before it may still be in
# its `continue` step (which submitted this one) when this one starts.
LOCK_WAIT_S = 120.0


def _this_run() -> tuple[str, int]:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise BadInput("not inside a Slurm job (SLURM_JOB_ID is unset); the batch script calls this")
    return job_id, int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def begin(jd: JobDir, phase: str, locked_at: float | None = None) -> int:
    """Record the allocation this run got (``locked_at``: when it got the job dir's lock); refuse a wrong phase."""
    job_id, restart = _this_run()
    env = {k: os.environ[k] for k in chain_mod.SHAPE_VARS if k in os.environ}
    chain_mod.write_env(jd, job_id, restart, env)
    record(jd, "start", job_id=job_id, restart=restart, phase=phase, env=env)
    state = jd.read_state()
    if state.get("status") == "COMPLETED":
        raise BadInput(f"{jd.root}: the job has already reached its goal; Slurm job {job_id} has nothing to do")
    if state.get("phase") != phase:
        raise BadInput(f"{jd.state_path}: the job is in phase {state.get('phase')!r} but Slurm job {job_id} "
                       f"was shaped for phase {phase!r}")
    sync_state(jd, status="STARTING")
    from fleetmpi.engine.watchdog import started_at
    # When the batch shell and this step started: bench/bench_rescale_slurm.py splits a rescale by them.
    marks = {"shell": started_at(os.getppid()), "process": started_at(), "locked": locked_at}
    jd.event("slurm_start", job_id=job_id, restart=restart, phase=phase, nodes=env.get("SLURM_JOB_NUM_NODES"),
             partition=env.get("SLURM_JOB_PARTITION"), nodelist=env.get("SLURM_JOB_NODELIST"), startup=marks)
    return ExitCode.OK


def _classify_stop(job_id: str, stop_signal: str, signal_time: float | None, spec: Spec, phase: str,
                   started: float | None) -> str:
    """Return 'timeout' when a stop came near the job's time limit, else 'preemption'."""
    if not stop_signal or signal_time is None:
        return "preemption"   # the ranks were signalled directly (scancel --signal, preemption)
    end: float | None = None
    try:
        text = run_slurm(["squeue", "--noheader", f"--jobs={job_id}", "--format=%e"]).strip()
        end = time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (SlurmCommandError, ValueError):
        limit = spec.phase(phase).time_min
        end = started + 60.0 * limit if started and limit else None
    grace = spec.scheduler.signal_grace_s
    return "timeout" if end is not None and end - signal_time <= grace + _TIMEOUT_SLACK_S else "preemption"


def _end(jd: JobDir, code: int, status: str, reason: str) -> int:
    record(jd, "end", exit_code=code, status=status, reason=reason)
    fields = {"status": status} if status == "COMPLETED" else {"status": status, "reason": reason}
    sync_state(jd, **fields)
    jd.event("slurm_end", exit_code=code, status=status, reason=reason)
    print(f"fleetmpi: job {status.lower()} ({reason}); exit code {code}", file=sys.stderr, flush=True)
    return code


class Action(Enum):
    """What the continuation does after a phase ended."""

    LOST = "lost"            # Slurm ended the allocation as lost: record it, end and submit nothing
    COMPLETE = "complete"    # the goal was reached: end the chain COMPLETED
    MISSED = "missed"        # exit 5: ended, model written, target not met under require_target: final, exit 5
    FAIL = "fail"            # the phase failed (exit 1 or 2): end the chain FAILED
    CANCEL = "cancel"        # TERM reached the batch shell: end the chain CANCELLED
    RESCALE = "rescale"      # exit 3: submit the phase the job moved to
    RESUBMIT = "resubmit"    # stopped by a signal after a checkpoint: the same phase again, within the caps
    NO_GOAL = "no_goal"      # exit 0 without the goal (srun does so when a node fails): FAILED
    CRASHED = "crashed"      # any other exit code (ranks killed or crashed): FAILED


@dataclass(frozen=True)
class PhaseExit:
    """How a phase ended: the action, and what the exit record says about a stop."""

    action: Action
    cancelled: bool = False  # TERM reached the batch shell (recorded as stop "cancelled")
    stopped: bool = False    # the ranks stopped for a signal: time limit or preemption, told apart later


def classify_exit(rc: int, stop_signal: str, goal_reached: bool, lost: str | None) -> PhaseExit:
    """Return what to do after a phase that exited ``rc`` (``stop_signal``: USR2, TERM or '').

    ``lost`` is Slurm's state of the job when Slurm ended it as lost (NODE_FAIL...), else None.
    """
    ended = rc in (ExitCode.OK, ExitCode.TARGET_MISSED) and goal_reached
    if lost and not ended:
        return PhaseExit(Action.LOST)
    # TERM to the batch shell means Slurm is ending the job (scancel, preemption by
    # cancellation, node shutdown); it kills what is left after KillWait. A person or a
    # policy wants it gone, so the chain ends there. USR2 (the time-limit warning, or
    # `scancel --signal=USR2 --batch`) asks for a checkpoint and a new allocation.
    cancelled = stop_signal == "TERM"
    # Ranks that a forwarded signal reached before they could install their handlers die of it.
    stopped = not cancelled and (
        rc == ExitCode.STOPPED or (bool(stop_signal) and rc not in set(ExitCode) - {ExitCode.STOPPED}))
    if rc == ExitCode.OK and goal_reached:
        action = Action.COMPLETE
    elif rc == ExitCode.TARGET_MISSED and goal_reached:
        action = Action.MISSED   # final like a failure: neither resubmitted nor retried
    elif rc in (ExitCode.FAILED, ExitCode.BAD_INPUT):
        action = Action.FAIL
    elif cancelled:
        action = Action.CANCEL
    elif rc == ExitCode.RESCALE:
        action = Action.RESCALE
    elif stopped:
        action = Action.RESUBMIT
    elif rc == ExitCode.OK:
        action = Action.NO_GOAL
    else:
        action = Action.CRASHED
    return PhaseExit(action, cancelled, stopped)


def after(jd: JobDir, phase: str, rc: int, stop_signal: str = "", signal_time: float | None = None,
          stalled_s: int = 0) -> int:
    """Act on the phase's exit code: submit what comes next or end the chain; return the script's code.

    ``stalled_s``: the script ended the step because its ranks were not all through MPI_Init
    after that many seconds (a crash, said as such).
    """
    from fleetmpi.spec import load
    job_id, restart = _this_run()
    spec = load(jd.spec)
    chain, _ = runs(jd)
    this: dict[str, Any] = next((r for r in reversed(chain) if r["job_id"] == job_id and r["restart"] == restart), {})
    goal_reached = jd.read_state().get("status") == "COMPLETED"
    # srun exits 0 when its node fails, and a node set DOWN (by an admin or a health check)
    # keeps running this script until KillWait is over: ask Slurm before believing rc.
    lost = None if rc in (ExitCode.OK, ExitCode.TARGET_MISSED) and goal_reached else _lost_state(job_id)
    verdict = classify_exit(rc, stop_signal, goal_reached, lost)
    if verdict.action is not Action.RESCALE:
        _withdraw_ahead(jd, job_id, restart, f"phase {phase} ended with exit code {rc}, not in a rescale")
    if verdict.action is Action.LOST:
        return _lost(jd, job_id, restart, phase, rc, stop_signal, str(lost))
    stop = None
    if verdict.cancelled:
        stop = "cancelled"
    elif verdict.stopped:
        stop = _classify_stop(job_id, stop_signal, signal_time, spec, phase, this.get("started"))
    stalled = {"mpi_init_deadline_s": stalled_s} if stalled_s > 0 else {}
    record(jd, "exit", job_id=job_id, restart=restart, phase=phase, exit_code=rc, signal=stop_signal or None, stop=stop,
           **stalled)
    jd.event("slurm_exit", job_id=job_id, restart=restart, phase=phase, exit_code=rc, signal=stop_signal or None, stop=stop,
             **stalled)
    if stalled and verdict.action is Action.CRASHED:
        return _end(jd, ExitCode.FAILED, "FAILED", f"phase {phase}: the ranks of its last start were not all through "
                    f"MPI_Init after {stalled_s} s (a hang in MPI start-up; ${MPI_INIT_DEADLINE_ENV} sets the wait); "
                    f"see {chain_mod.log_path(jd, job_id)}")
    return _act(jd, spec, phase, job_id, restart, rc, verdict.action, stop)


def submit_ahead(jd: JobDir, spec: Spec, target: str) -> str | None:
    """Submit phase ``target`` ahead (``_submit_ahead``); return its job id, or None.

    Never raises: rank 0 calls it after the rescale's checkpoint, and a failure costs only
    the head start (recorded as ``slurm_submit_ahead_failed``; the continuation submits).
    """
    try:
        return _submit_ahead(jd, spec, target)
    except Exception as e:
        with contextlib.suppress(OSError):
            jd.event("slurm_submit_ahead_failed", phase=target, error=f"{type(e).__name__}: {e}")
        return None


def _submit_ahead(jd: JobDir, spec: Spec, target: str) -> str | None:
    """Submit phase ``target`` from inside the phase that rescales to it (rank 0, checkpoint committed).

    Slurm places a job only at its scheduling passes (about one a second on the minicluster,
    sched_interval and bf_interval); submitted while the ranks still exit, the job is queued
    when the old one ends, and where the old job leaves room (a wider phase on partly free
    nodes) it starts during that exit. Its `begin` waits for the job dir's lock, which this
    allocation's batch shell holds until the continuation is done, so the two never write at
    once; the continuation withdraws it if the phase ends otherwise. Returns the job id, or
    None where this is no running batch job of a chain (``fleetmpi run`` in an allocation)
    or Slurm refused: the continuation then submits as before.
    """
    job_id, restart = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    chain, _ = runs(jd)
    if not job_id or not chain or (chain[-1]["job_id"], chain[-1]["restart"]) != (job_id, restart) \
            or "started" not in chain[-1]:
        return None
    from fleetmpi.launch.slurm.backend import SlurmBackend
    # sbatch hands its environment to the job: not this rank's step and task variables (srun's
    # SLURM_STEP_*, PMI_* of the old step...), which the next batch shell and its srun must not see.
    env = {k: v for k, v in os.environ.items() if not k.startswith(_TASK_VARS)}
    try:
        return SlurmBackend(jd, spec, out=io.StringIO()).submit(target, by="rescale", env=env)
    except (SubmissionError, SlurmCommandError) as e:
        _withdraw_ahead(jd, job_id, restart, f"submitting it ahead failed: {e}")
        return None


def _ahead(jd: JobDir, job_id: str, restart: int) -> list[dict[str, Any]]:
    """Return the runs this run's rank 0 submitted ahead (``submit_ahead``): those right after
    it in the chain that a rescale submitted.

    Not any later run: when a node fails, Slurm ends the job NODE_FAIL while its batch script
    may still be running to here, and the manager may meanwhile have submitted the retry
    (by "manager"); withdrawing that cost the job an attempt (seen in the node-failure test).
    """
    chain, _ = runs(jd)
    mine = [i for i, r in enumerate(chain) if (r["job_id"], r["restart"]) == (job_id, restart)]
    if not mine:
        return []
    out = []
    for r in chain[mine[-1] + 1:]:
        if r["by"] != "rescale":
            break
        out.append(r)
    return out


def _withdraw_ahead(jd: JobDir, job_id: str, restart: int, why: str) -> None:
    """Cancel the jobs submitted ahead of this run's end and take them out of the chain (they never began)."""
    for r in _ahead(jd, job_id, restart):
        try:
            cancel(r["job_id"])
            outcome = "cancelled"
        except SlurmCommandError as e:
            # It cannot write the job dir all the same: its `begin` finds it is no run of the chain.
            outcome = f"scancel failed: {e}"
        record(jd, "withdraw", job_id=r["job_id"], restart=r["restart"], phase=r["phase"], reason=why)
        jd.event("slurm_withdrawn", job_id=r["job_id"], phase=r["phase"], reason=why, outcome=outcome)


def _rank_error(jd: JobDir) -> str | None:
    """Return the ranks' own reason for this phase's failure (the newest ``error`` event since it started)."""
    why = None
    for ev in jd.read_events():
        if ev.get("event") == "phase_start":
            why = None
        elif ev.get("event") == "error" and ev.get("message"):
            why = str(ev["message"]).removeprefix("fleetmpi: ")
    return why


def _act(jd: JobDir, spec: Spec, phase: str, job_id: str, restart: int, rc: int, action: Action,
         stop: str | None) -> int:
    """Record the chain's end or submit what comes next, as ``action`` says; return the script's code."""
    from fleetmpi.launch.slurm.backend import SlurmBackend, describe_phase
    state = jd.read_state()
    backend = SlurmBackend(jd, spec)
    if action is Action.COMPLETE:
        return _end(jd, ExitCode.OK, "COMPLETED", str(state.get("reason") or "goal"))
    if action is Action.MISSED:
        return _end(jd, ExitCode.TARGET_MISSED, "COMPLETED", str(state.get("reason") or "target not met"))
    if action is Action.FAIL:
        why = _rank_error(jd) or ExitCode(rc).meaning
        return _end(jd, rc, "FAILED", f"phase {phase}: {why}; see {chain_mod.log_path(jd, job_id)}")
    if action is Action.CANCEL:
        return _end(jd, ExitCode.STOPPED, "CANCELLED", f"Slurm job {job_id} was cancelled (TERM: scancel, preemption or "
                    f"shutdown); `fleetmpi submit {jd.root}` resumes from the newest checkpoint")
    if action is Action.RESCALE:
        target = state.get("phase")
        if target == phase or target not in spec.fleet.phases:
            return _end(jd, ExitCode.FAILED, "FAILED", f"phase {phase} asked for a rescale but named no new phase")
        if any(r["phase"] == target for r in _ahead(jd, job_id, restart)):
            return ExitCode.OK   # rank 0 submitted it once the checkpoint was committed (submit_ahead)
        try:
            backend.submit(str(target), by="rescale")
        except SubmissionError as e:
            return _end(jd, e.exit_code, "FAILED", f"could not submit phase {target}: {e}")
        return ExitCode.OK
    if action is Action.RESUBMIT and stop is not None:
        counter, cap = (("slurm_timeouts", spec.scheduler.max_timeouts) if stop == "timeout"
                        else ("slurm_preemptions", spec.scheduler.max_preemptions))
        n = int(state.get(counter, 0)) + 1
        sync_state(jd, **{counter: n})
        if n > cap:
            key = "max_timeouts" if stop == "timeout" else "max_preemptions"
            return _end(jd, ExitCode.STOPPED, "STOPPED", f"stopped by {stop} {n} times (scheduler.{key}={cap}); "
                        f"`fleetmpi submit {jd.root}` resumes from the newest checkpoint")
        try:
            if spec.scheduler.requeue:
                record(jd, "requeue", job_id=job_id, restart=restart + 1, phase=phase,
                       shape=spec.phase(phase).shape(), by=stop)
                sync_state(jd, status="QUEUED")
                requeue(job_id, shape=describe_phase(spec, phase), attempts=spec.scheduler.submit_attempts,
                        backoff_s=spec.scheduler.submit_backoff_s)
            else:
                backend.submit(phase, by=stop)
        except SubmissionError as e:
            return _end(jd, e.exit_code, "FAILED", f"could not resubmit phase {phase} after a {stop}: {e}")
        return ExitCode.OK
    if action is Action.NO_GOAL:
        return _end(jd, ExitCode.FAILED, "FAILED", f"phase {phase}: the step exited 0 but the job did not reach its goal "
                    f"(srun does so when a node fails); see {chain_mod.log_path(jd, job_id)}")
    return _end(jd, ExitCode.FAILED, "FAILED", f"phase {phase}: the ranks ended with exit code {rc} "
                f"(killed or crashed); see {chain_mod.log_path(jd, job_id)}")


def _lost_state(job_id: str) -> str | None:
    """Return Slurm's state of this job if Slurm ended it because its allocation was lost, else None."""
    try:
        state = squeue_states([job_id]).get(job_id)
    except SlurmCommandError:
        return None  # cannot tell: go by the exit code
    return state if state in LOST_STATES else None


def _lost(jd: JobDir, job_id: str, restart: int, phase: str, rc: int, stop_signal: str, lost: str) -> int:
    """Record that this run's allocation was lost, ending nothing and submitting nothing.

    The manager retries such a run from the newest checkpoint (one retry layer); without
    a manager, `fleetmpi submit` resumes. The chain record comes last: once it is written
    the manager may start the next attempt, which this process must not write over.
    """
    jd.event("slurm_exit", job_id=job_id, restart=restart, phase=phase, exit_code=rc, signal=stop_signal or None,
             stop="lost", slurm_state=lost)
    print(f"fleetmpi: Slurm ended job {job_id} as {lost} (its allocation was lost; step exit code {rc} means "
          f"nothing); the chain stops without an end: `fleetmpi submit {jd.root}` resumes from the newest "
          "checkpoint", file=sys.stderr, flush=True)
    record(jd, "exit", job_id=job_id, restart=restart, phase=phase, exit_code=rc, signal=stop_signal or None,
           stop="lost", slurm_state=lost)
    return ExitCode.FAILED


def _end_unexpectedly(jd: JobDir, code: int, reason: str) -> int:
    """End the chain FAILED from a continuation that could not act, withdrawing a job submitted ahead first."""
    job_id, restart = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if job_id:
        _withdraw_ahead(jd, job_id, restart, f"the continuation of Slurm job {job_id} failed: {reason}")
    return _end(jd, code, "FAILED", reason)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the batch script's steps: ``begin`` and ``continue``."""
    p = argparse.ArgumentParser(prog="python -m fleetmpi.launch.slurm.batch")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("begin")
    b.add_argument("job_dir")
    b.add_argument("--phase", required=True)
    c = sub.add_parser("continue")
    c.add_argument("job_dir")
    c.add_argument("--phase", required=True)
    c.add_argument("--exit-code", type=int, required=True)
    c.add_argument("--signal", default="")
    c.add_argument("--signal-time", default="")
    c.add_argument("--stalled-s", type=int, default=0)
    args = p.parse_args(argv)
    jd = JobDir(args.job_dir)
    if args.cmd == "continue":
        # The phase has ended: a late time-limit warning or TERM must not cut the records
        # short (this process replaced the batch shell and its traps; SIGKILL still ends it).
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # One writer per job dir: the batch shell opened JOB_DIR/lock (FLEETMPI_LOCK_FD); `begin`
    # locks that open file, so the shell holds the lock for the allocation's life, and
    # `continue` (the shell itself, exec'd) releases it once what follows is submitted.
    # `begin` waits for the previous allocation's `continue` to finish releasing.
    lock = JobLock(jd, f"slurm job {os.environ.get('SLURM_JOB_ID', '?')} phase {args.phase}",
                   wait_s=LOCK_WAIT_S if args.cmd == "begin" else 0.0,
                   pid=os.getppid() if args.cmd == "begin" else os.getpid())
    try:
        lock.acquire()
    except JobDirBusy as e:   # someone else writes this job dir: write nothing, end the allocation
        print(f"fleetmpi: error: {e}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    try:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if job_id and not any(r["job_id"] == job_id for r in runs(jd)[0]):
            # Withdrawn (submitted ahead for a rescale that did not happen) but not cancelled in
            # time: no run of the chain, so it writes nothing and ends.
            print(f"fleetmpi: error: Slurm job {job_id} is no run of {chain_mod.chain_path(jd)} (withdrawn or "
                  "never recorded); it writes nothing and ends", file=sys.stderr, flush=True)
            return ExitCode.BAD_INPUT
        if args.cmd == "begin":
            return begin(jd, args.phase, time.time())
        when = float(args.signal_time) if args.signal_time else None
        return after(jd, args.phase, args.exit_code, args.signal, when, args.stalled_s)
    except BadInput as e:
        print(f"fleetmpi: error: {e}", file=sys.stderr, flush=True)
        if args.cmd == "continue":
            return _end_unexpectedly(jd, ExitCode.BAD_INPUT, str(e))
        return ExitCode.BAD_INPUT
    except Exception as e:
        traceback.print_exc()
        if args.cmd == "continue":
            try:
                return _end_unexpectedly(jd, ExitCode.FAILED, f"continuation crashed: {type(e).__name__}: {e}")
            except Exception:
                pass
        return ExitCode.FAILED
    finally:
        if args.cmd == "begin":
            lock.hand_over()   # the batch shell keeps holding it
        else:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
