"""Backends the manager drives: start a job, poll all its allocations at once, cancel one.

A backend has three operations: ``launch(job, attempt) -> Launch`` (its ``backend_id``
names the allocation), ``poll(allocations) -> {backend_id: AllocState}`` called ONCE per
manager cycle with every live allocation of that backend (Slurm: one ``squeue``), and
``cancel(allocation)``. ``poll`` takes the ledger's allocation rows rather than bare ids
so that a backend can use what it recorded at launch (the local one: pid, process start
time and the events offset at launch); a batched backend reads only ``backend_id``.

Backends never retry (see manager.py: the manager is the one retry layer); a launch that
failed for a reason worth retrying raises :class:`TransientLaunchError`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fleetmpi.errors import ExitCode, FleetError
from fleetmpi.jobdir import JobDir, make_dirs
from fleetmpi.jobs.rows import AllocRow, JobRow

# Slurm's states of an allocation that has not ended (local: PENDING/RUNNING only).
LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD",
                         "STOPPED", "UNKNOWN"})


class TransientLaunchError(FleetError):
    """A launch failed for a reason that may pass (capacity, a scheduler timeout): retry later."""


@dataclass(frozen=True)
class AllocState:
    """What a backend says about one allocation: state, exit code of its last phase, detail."""

    state: str
    exit_code: int | None = None
    detail: str = ""

    @property
    def ended(self) -> bool:
        """Return whether the allocation has ended (its state is none of LIVE_STATES)."""
        return self.state not in LIVE_STATES


@dataclass(frozen=True)
class Launch:
    """What a launch returns: the backend's id for it, the host it runs from, and its log."""

    backend_id: str
    host: str | None
    log: str | None
    info: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """The three operations the manager needs from a backend; none of them retries."""

    name: str  # the spec's scheduler.backend value this backend serves ("local", "slurm")

    def launch(self, job: JobRow, attempt: int) -> Launch:
        """Start attempt ``attempt`` (1-based) of ``job`` from its job dir's newest checkpoint; return at once.

        Raise TransientLaunchError when a later try may succeed (capacity, a scheduler
        timeout); any other FleetError fails the job.
        """
        ...

    def poll(self, allocations: Sequence[AllocRow]) -> dict[str, AllocState]:
        """Return the state of every live allocation given, by backend_id, in one query per call.

        An allocation missing from the answer is taken as still live; an ended one carries
        the exit code of its last phase (fleetmpi.errors.ExitCode, or another code for a crash).
        """
        ...

    def cancel(self, allocation: AllocRow) -> None:
        """Ask ``allocation`` to stop (its ranks checkpoint and exit 4); return without waiting."""
        ...


# Runners this process started, so that it reaps them (and reads their exit code) itself.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _start_time(pid: int) -> float | None:
    import psutil
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


class LocalJobs:
    """Run each attempt as ``python -m fleetmpi.cli run JOB_DIR`` in a session of its own.

    ``fleetmpi run`` runs every phase of the job (rescales included) with mpiexec and
    resumes from the newest checkpoint, so one attempt is one process; its process group
    is what ``cancel`` signals (SIGTERM: the ranks checkpoint and exit 4).
    """

    name = "local"

    def __init__(self) -> None:
        self.host = socket.gethostname()

    def launch(self, job: JobRow, attempt: int) -> Launch:
        from fleetmpi.launch.local import worker_env
        from fleetmpi.lock import LOCK_FD_ENV, JobDirBusy, JobLock
        jd = JobDir(job.job_dir)
        if not jd.exists():
            raise FileNotFoundError(f"{jd.root}: job dir is missing or holds no spec.yaml/state.json")
        make_dirs(jd.logs)
        log = jd.logs / f"manager-attempt-{attempt}.log"
        offset = jd.events.stat().st_size if jd.events.exists() else 0
        cmd = [sys.executable, "-m", "fleetmpi.cli", "run", str(jd.root)]
        # The manager takes the job dir's lock (a busy one is a transient launch error)
        # and hands the open lock file to its runner, which holds it from birth: nothing can
        # slip in between, and the manager never waits on a lock its own child holds.
        try:
            lock = JobLock(jd, "fleetmpi manager").acquire()
        except JobDirBusy as e:
            raise TransientLaunchError(str(e)) from None   # someone runs it by hand: try again later
        try:
            env = {**worker_env(), "FLEETMPI_PROGRESS": "lines", LOCK_FD_ENV: str(lock.fileno())}
            with os.fdopen(jd.open_append(log), "ab") as out:
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=jd.root, env=env, start_new_session=True, pass_fds=(lock.fileno(),))
        except BaseException:
            lock.release()
            raise
        lock.hand_over()
        _CHILDREN[proc.pid] = proc
        info = {"pid": proc.pid, "start_time": _start_time(proc.pid), "events_from": offset, "job_dir": str(jd.root)}
        return Launch(backend_id=f"{self.host}:{proc.pid}", host=self.host, log=str(log), info=info)

    def poll(self, allocations: Sequence[AllocRow]) -> dict[str, AllocState]:
        out: dict[str, AllocState] = {}
        for a in allocations:
            if a.host != self.host:
                # Only the host that started a process can see it; its manager polls it.
                out[a.backend_id] = AllocState("UNKNOWN", None, f"started on {a.host}; poll from there")
                continue
            pid = int(a.info["pid"])
            alive, rc = self._alive(pid, a.info.get("start_time"))
            out[a.backend_id] = AllocState("RUNNING") if alive else self._ended(a, rc)
        return out

    def cancel(self, allocation: AllocRow) -> None:
        if allocation.host != self.host:
            raise FleetError(f"allocation {allocation.backend_id} runs on {allocation.host}; cancel it from there")
        pid = int(allocation.info["pid"])
        if self._alive(pid, allocation.info.get("start_time"))[0]:
            try:
                if allocation.info.get("group", True):
                    os.killpg(pid, signal.SIGTERM)  # the runner's session: runner and mpiexec forward to ranks
                else:
                    os.kill(pid, signal.SIGTERM)    # a `fleetmpi run` started by hand shares its shell's group
            except ProcessLookupError:
                pass

    @staticmethod
    def _alive(pid: int, start_time: float | None) -> tuple[bool, int | None]:
        """Return (running, exit code when this process could reap it)."""
        import psutil
        proc = _CHILDREN.get(pid)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return True, None
            del _CHILDREN[pid]
            return False, rc
        try:
            p = psutil.Process(pid)
            if start_time is not None and abs(p.create_time() - float(start_time)) > 1.0:
                return False, None  # the pid now belongs to another process
            if p.status() != psutil.STATUS_ZOMBIE:
                return True, None
        except psutil.Error:
            return False, None
        try:  # a zombie: reap it if it is ours (a runner started by an earlier Manager here)
            _, status = os.waitpid(pid, os.WNOHANG)
            return False, os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            return False, None

    @staticmethod
    def _ended(a: AllocRow, rc: int | None) -> AllocState:
        """Read how an attempt ended from its job dir (the phase exit code, not the runner's)."""
        jd = JobDir(a.info["job_dir"])
        code: int | None = None
        meaning = error = ""
        for ev in read_events(jd.events, int(a.info.get("events_from", 0)))[0]:
            if ev.get("event") == "phase_exit":
                code, meaning = ev.get("exit_code"), str(ev.get("meaning", ""))
            elif ev.get("event") == "error":
                error = str(ev.get("message", ""))
        detail = error or meaning  # the rank's own message says more than the exit code's meaning
        if code is None:
            try:
                status = jd.read_state().get("status")
            except FleetError:
                status = None
            if status == "COMPLETED":
                code = int(ExitCode.OK)
            elif rc is not None:
                code, detail = rc, "the runner `fleetmpi run` ended before any phase ended"
            else:
                return AllocState("LOST", None, f"runner pid {a.info.get('pid')} is gone and {jd.events} "
                                                "records no phase exit")
        return AllocState("COMPLETED" if ExitCode.of(code) is ExitCode.OK else "FAILED", code, detail)


def read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Return the whole JSON lines of ``path`` after byte ``offset`` and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a torn last line waits for the next fold
    out = []
    for line in data[:end].split(b"\n")[:-1]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out, offset + end


def last_metrics(path: Path, tail_bytes: int = 8192) -> dict[str, Any]:
    """Return the last whole line of a metrics.jsonl ({} if none), reading only its tail."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail_bytes))
            data = f.read()
    except FileNotFoundError:
        return {}
    for line in reversed(data.split(b"\n")[:-1]):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            return rec
    return {}


class SlurmJobs:
    """Run each attempt as a chain of Slurm batch jobs (:mod:`fleetmpi.launch.slurm.backend`).

    One launch submits the job's current phase; the chain then resubmits itself through
    rescales and stops (near the time limit, preemption) and records its end in
    ``JOB_DIR/slurm/chain.jsonl``. So an allocation here is a whole chain: ``backend_id``
    is its first Slurm job id, and ``poll`` reads each chain's newest job from the job dir
    and asks ONE ``squeue`` about all of them (``sacct`` only for ids squeue forgot).
    """

    name = "slurm"
    # How long a chain may sit between a job's exit file and its next record (the
    # continuation step runs right after the exit file is written).
    continuation_grace_s = 120.0

    def launch(self, job: JobRow, attempt: int) -> Launch:
        import dataclasses

        from fleetmpi import spec as specmod
        from fleetmpi.errors import BadInput
        from fleetmpi.launch.slurm.backend import SlurmBackend
        from fleetmpi.launch.slurm.chain import runs
        from fleetmpi.launch.slurm.cmd import SlurmCommandError, squeue_states
        from fleetmpi.launch.slurm.submit import ShapeUnavailable, SubmissionError, release
        jd = JobDir(job.job_dir)
        spec = specmod.load(jd.spec)
        # The manager is the retry layer for launches it makes: one sbatch try each. A retry
        # finds the job a timed-out sbatch did create by its submission key.
        spec = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, submit_attempts=1))
        chain, end = runs(jd)
        info: dict[str, Any] = {"job_dir": str(jd.root), "chain_from": len(chain)}
        try:
            if chain and end is None:
                # A chain this job already has (a launch whose release failed, or a manager
                # that died after sbatch): adopt it instead of starting a second one.
                jid = str(chain[-1]["job_id"])
                if squeue_states([jid]).get(jid) in LIVE_STATES:
                    release(jid, shape=jid, attempts=1, backoff_s=0.0)
                    info["chain_from"] = len(chain) - 1
                    return Launch(backend_id=jid, host=None, log=str(jd.logs / f"slurm-{jid}.out"), info=info)
            if chain:
                jd.event("resume_requested", status=jd.read_state().get("status"), by="manager")
                jd.update_state(slurm_timeouts=0, slurm_preemptions=0)
            phase = str(jd.read_state()["phase"])
            jid = SlurmBackend(jd, spec, out=io.StringIO()).submit(phase, by="manager")
        except (ShapeUnavailable, BadInput):
            raise
        except SubmissionError as e:
            if "not a transient error" in str(e):
                raise
            raise TransientLaunchError(str(e)) from None
        except SlurmCommandError as e:
            raise TransientLaunchError(str(e)) from None
        return Launch(backend_id=jid, host=None, log=str(jd.logs / f"slurm-{jid}.out"), info=info)

    def poll(self, allocations: Sequence[AllocRow]) -> dict[str, AllocState]:
        from fleetmpi.launch.slurm.chain import read_exit, runs
        from fleetmpi.launch.slurm.cmd import LOST_STATES, sacct_states, squeue_states
        out: dict[str, AllocState] = {}
        newest: dict[str, tuple[AllocRow, str, int]] = {}
        for a in allocations:
            jd = JobDir(a.info["job_dir"])
            chain, end = runs(jd)
            mine = chain[int(a.info.get("chain_from", 0)):]
            if end is not None and mine:
                out[a.backend_id] = _chain_end(end, mine[-1])
            elif not mine:
                out[a.backend_id] = AllocState("LOST", None, f"{jd.root}/slurm/chain.jsonl records no submission")
            else:
                newest[a.backend_id] = (a, str(mine[-1]["job_id"]), int(mine[-1]["restart"]))
        queued = squeue_states(j for _, j, _ in newest.values()) if newest else {}
        gone = [j for _, j, _ in newest.values() if queued.get(j) not in LIVE_STATES]
        accounted = sacct_states(j for j in gone if j not in queued) if gone else {}
        for bid, (a, jid, restart) in newest.items():
            state = queued.get(jid) or accounted.get(jid, ("", None))[0]
            if state in LIVE_STATES:
                out[bid] = AllocState(state)
                continue
            jd = JobDir(a.info["job_dir"])
            chain, end = runs(jd)
            if end is not None or str(chain[-1]["job_id"]) != jid or int(chain[-1]["restart"]) != restart:
                out[bid] = AllocState("RUNNING", None, "the chain moved on since this cycle began")
                continue
            if state in LOST_STATES and chain[-1].get("stop") == "lost":
                # The continuation saw it too and left the chain alone (fleetmpi.launch.slurm.backend.after).
                out[bid] = AllocState(state, None, f"Slurm job {jid} ended {state}: its allocation was lost; "
                                                   f"see logs/slurm-{jid}.out")
                continue
            code = read_exit(jd, jid, restart)
            if code is not None:
                # The batch script outlived the phase; its continuation may still be writing.
                age = time.time() - exit_mtime(jd, jid, restart)
                if age < self.continuation_grace_s:
                    out[bid] = AllocState("RUNNING", None, "continuing")
                elif state in LOST_STATES:  # a step's exit code means nothing there (srun exits 0)
                    out[bid] = AllocState(state, None, f"Slurm job {jid} ended {state} and its continuation "
                                                       f"recorded nothing; see logs/slurm-{jid}.out")
                else:
                    out[bid] = AllocState("LOST", code, f"Slurm job {jid} exited {code} but its continuation "
                                                        f"recorded nothing; see logs/slurm-{jid}.out")
                continue
            # The batch script never wrote an exit code: the allocation itself was lost.
            why = f"Slurm job {jid} ended {state or 'unknown to squeue and sacct'} without an exit code"
            out[bid] = AllocState(state if state and state != "COMPLETED" else "LOST", None, why)
        return out

    def cancel(self, allocation: AllocRow) -> None:
        from fleetmpi.launch.slurm.chain import live_job_ids, runs
        from fleetmpi.launch.slurm.submit import cancel
        jd = JobDir(allocation.info["job_dir"])
        chain, end = runs(jd)
        if chain and end is None:
            # Two live jobs in a rescale's last moments (the next phase submitted ahead): both.
            for job_id in live_job_ids(chain) or [str(chain[-1]["job_id"])]:
                jd.event("cancel_requested", job_id=job_id, by="fleetmpi cancel")
                cancel(job_id)


def exit_mtime(jd: JobDir, job_id: str, restart: int) -> float:
    from fleetmpi.launch.slurm.chain import exit_path
    try:
        return exit_path(jd, job_id, restart).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _chain_end(end: dict[str, Any], last: dict[str, Any]) -> AllocState:
    """Map a chain's end record and its last run to an allocation state the manager classifies.

    The chain's own codes fold a killed rank into exit 1; the run's exit code tells them
    apart, so ranks killed under Slurm are retried like killed ranks on this machine.
    """
    status, code, reason = str(end.get("status")), end.get("exit_code"), str(end.get("reason") or "")
    if status == "COMPLETED":   # exit 5 (target missed) stays 5: the manager ends the job on it, unretried
        return AllocState("COMPLETED", int(code) if isinstance(code, int) else int(ExitCode.OK), reason)
    if status == "STOPPED":  # the chain's own resubmissions after stops reached their cap
        return AllocState("CHAIN_STOPPED", code, reason)
    if status == "CANCELLED":  # TERM to the batch shell: scancel, or Slurm ending the job
        return AllocState("CANCELLED", code, reason)
    ran = last.get("exit_code")
    if isinstance(ran, int) and ExitCode.of(ran) is None and not last.get("signal"):
        return AllocState("FAILED", ran, reason)
    return AllocState("FAILED", code, reason)


def default_backends() -> dict[str, Backend]:
    """Return the backends the manager drives, by name (creating one starts nothing)."""
    return {"local": LocalJobs(), "slurm": SlurmJobs()}


__all__ = ["AllocState", "Backend", "Launch", "LocalJobs", "SlurmJobs", "TransientLaunchError", "default_backends",
           "last_metrics", "read_events"]
