"""Slurm backend: each phase is one batch job, and the job resubmits itself from inside.

Submission side (login node): :class:`SlurmBackend` checks every phase's shape with
``sbatch --test-only``, renders and submits the start phase, and can follow the chain to
its end. The batch side (what runs inside each allocation) is :mod:`.batch`. All Slurm
commands go through :mod:`.cmd`.
"""

from __future__ import annotations

import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import fleetmpi
from fleetmpi.errors import BadInput, ExitCode
from fleetmpi.jobdir import JobDir, atomic_write_bytes, make_dirs
from fleetmpi.launch.slurm import chain as chain_mod
from fleetmpi.launch.slurm.chain import live_job_ids, record, runs, sync_state
from fleetmpi.launch.slurm.cmd import (
    ACTIVE_STATES,
    IdleNodes,
    SlurmCommandError,
    sacct_states,
    squeue_states,
)
from fleetmpi.launch.slurm.script import BatchCommand, phase_options, render_sbatch
from fleetmpi.launch.slurm.submit import (
    ShapeUnavailable,
    SubmissionError,
    cancel,
    dry_run,
    release,
    submission_key,
    submit_held,
)
from fleetmpi.spec import Spec

__all__ = [
    "IdleNodes",
    "ShapeUnavailable",
    "SlurmBackend",
    "SlurmCommandError",
    "SubmissionError",
    "render_phase",
    "sacct_states",
    "squeue_states",
    "status_report",
]



def describe_phase(spec: Spec, phase: str) -> str:
    """Return a phase's shape in words, for errors: what Slurm was asked for."""
    ph = spec.phase(phase)
    parts = [f"{ph.nodes} node(s) x {ph.ranks_per_node} rank(s) x {ph.cpus_per_rank} CPU(s)",
             f"partition {ph.partition or '(default)'}"]
    if ph.gpus_per_node:
        parts.append(f"gres gpu:{ph.gpus_per_node}")
    if ph.mem_gb:
        parts.append(f"mem {ph.mem_gb:g} GB")
    return f"phase {phase} ({ph.shape()}: {', '.join(parts)})"


def render_phase(spec: Spec, jd: JobDir, phase: str, key: str) -> str:
    """Return the batch script that runs ``phase`` of the job in ``jd``."""
    sch = spec.scheduler
    mpiexec = None
    if sch.launcher == "mpiexec":
        from fleetmpi.launch.local import find_mpiexec
        mpiexec = find_mpiexec(spec)[0]
    cmd = BatchCommand(job_dir=str(jd.root.resolve()), python=sys.executable,
                       pythonpath=str(Path(fleetmpi.__file__).resolve().parent.parent), phase=phase,
                       shape=spec.phase(phase).shape(), launcher=sch.launcher,
                       launcher_args=tuple(sch.launcher_args), mpiexec=mpiexec,
                       threads=spec.phase(phase).threads)
    try:
        return render_sbatch(cmd, **phase_options(spec, phase, comment=key))
    except ValueError as e:
        raise BadInput(f"{describe_phase(spec, phase)}: {e}") from None


class SlurmBackend:
    """Submit a job's phases to Slurm and follow the chain of batch jobs."""

    def __init__(self, jd: JobDir, spec: Spec, out: TextIO = sys.stderr,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.jd, self.spec, self.out, self.sleep = jd, spec, out, sleep

    def preflight(self) -> None:
        """Ask Slurm (``sbatch --test-only``) whether every phase's shape can ever run; BadInput if not."""
        sch = self.spec.scheduler
        with tempfile.TemporaryDirectory(prefix="fleetmpi-preflight-") as tmp:
            for name in self.spec.fleet.phases:
                script = Path(tmp) / f"{name}.sbatch"
                script.write_text(render_phase(self.spec, self.jd, name, "fleetmpi.preflight"))
                try:
                    dry_run(script, cwd=Path(tmp), shape=describe_phase(self.spec, name),
                            attempts=sch.submit_attempts, backoff_s=sch.submit_backoff_s, sleep=self.sleep)
                except ShapeUnavailable as e:
                    raise BadInput(f"{e}; change fleet.phases.{name} to a shape the cluster has "
                                   "(see `sinfo -o '%P %D %c %G'`)") from None

    def submit(self, phase: str, by: str, env: Mapping[str, str] | None = None) -> str:
        """Submit ``phase`` (once per intent, held until recorded); return the Slurm job id.

        ``env``: the environment sbatch passes on to the job (default this process's).
        """
        jd, sch = self.jd, self.spec.scheduler
        state = jd.read_state()
        uid = state.get("slurm_uid")
        if not isinstance(uid, str):
            uid = secrets.token_hex(6)
            jd.update_state(slurm_uid=uid)
        index = chain_mod.submissions(jd)
        key = submission_key(uid, index)
        make_dirs(chain_mod.slurm_dir(jd))
        script = chain_mod.slurm_dir(jd) / f"{index:03d}-{phase}.sbatch"
        atomic_write_bytes(script, render_phase(self.spec, jd, phase, key).encode())
        shape_words = describe_phase(self.spec, phase)

        def on_retry(attempt: int, err: str, wait: float) -> None:
            jd.event("slurm_retry", attempt=attempt, error=err, wait_s=wait, key=key)
            self._say(f"fleetmpi: Slurm failed (try {attempt}), retrying in {wait:g} s: {err}")

        # The intent is written before the first sbatch: only a key someone already set out to
        # submit can have a job behind it, so a fresh key costs no squeue lookup.
        tried_before = chain_mod.intent_recorded(jd, key)
        if not tried_before:
            record(jd, "intent", index=index, key=key, phase=phase)
        job_id, adopted = submit_held(script, cwd=jd.root, key=key, job_name=self.spec.name, shape=shape_words,
                                      attempts=sch.submit_attempts, backoff_s=sch.submit_backoff_s,
                                      on_retry=on_retry, sleep=self.sleep, look_first=tried_before, env=env)
        shape = self.spec.phase(phase).shape()
        record(jd, "submit", index=index, job_id=job_id, restart=0, phase=phase, shape=shape, key=key, by=by,
               adopted=adopted, script=script.name)
        jd.event("slurm_submit", job_id=job_id, phase=phase, shape=shape, by=by, key=key, adopted=adopted)
        sync_state(jd, status="QUEUED")
        # Released only now: the job cannot write the job dir before its submission is recorded.
        try:
            release(job_id, shape=shape_words, attempts=sch.submit_attempts, backoff_s=sch.submit_backoff_s,
                    on_retry=on_retry, sleep=self.sleep)
        except SubmissionError as e:
            # A held job would wait forever; cancel it so the next try starts clean.
            try:
                cancel(job_id)
                gone = "cancelled it"
            except SlurmCommandError as c:
                gone = f"could not cancel it either ({c}); it stays held and never runs"
            jd.event("slurm_release_failed", job_id=job_id, error=str(e), outcome=gone)
            raise SubmissionError(f"Slurm job {job_id} was submitted held but not released; {gone}: {e}") from None
        self._say(f"fleetmpi: submitted Slurm job {job_id}: {describe_phase(self.spec, phase)}"
                  + (" (found the job an earlier try had created)" if adopted else ""))
        return job_id

    def follow(self, poll_s: float = 1.0, lost_grace_s: float = 15.0, cancel_on_signal: bool = False) -> int:
        """Wait for the chain of batch jobs to end; return the training's final exit code.

        With ``cancel_on_signal`` a SIGTERM or SIGINT to this process (a workflow engine
        interrupted) cancels the chain: its running job gets scancel (TERM to the batch
        shell: the ranks checkpoint, nothing is resubmitted), the chain's end is awaited and
        the return is exit 4 (stopped) with a line saying how to resume. A second signal
        stops waiting at once.
        """
        got: list[int] = []
        if not cancel_on_signal:
            return self._follow(poll_s, lost_grace_s, got)
        old = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._follow(poll_s, lost_grace_s, got)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _resume_hint(self) -> str:
        return f"`fleetmpi submit {self.jd.root} --wait` resumes from the newest checkpoint"

    def _follow(self, poll_s: float, lost_grace_s: float, got: list[int]) -> int:
        jd = self.jd
        shown: dict[tuple[str, int], str] = {}
        lost_since: float | None = None
        cancelled: str | None = None   # the Slurm job this follower cancelled on a signal
        while True:
            chain, end = runs(jd)
            if end is not None:
                self._say(f"fleetmpi: chain ended: {end.get('status')} ({end.get('reason')}); "
                          f"exit code {end['exit_code']}")
                if cancelled is not None and end.get("status") == "CANCELLED":
                    self._say(f"fleetmpi: stopped on {signal.Signals(got[0]).name}; {self._resume_hint()}")
                    return ExitCode.STOPPED
                return int(end["exit_code"])
            if got and cancelled is None and chain:
                ids = live_job_ids(chain) or [str(chain[-1]["job_id"])]
                cancelled = " ".join(ids)   # one id, or two: "Slurm job 101 102", "scancel 101 102"
                name = signal.Signals(got[0]).name
                try:
                    for job_id in ids:   # two where rank 0 submitted a rescale's next phase ahead
                        jd.event("cancel_requested", job_id=job_id, by=f"fleetmpi submit --wait ({name})")
                        cancel(job_id)
                except SlurmCommandError as e:
                    self._say(f"fleetmpi: got {name} but could not cancel Slurm job {cancelled}: {e}; "
                              f"it goes on (`scancel {cancelled}` stops it)")
                    return ExitCode.STOPPED
                self._say(f"fleetmpi: got {name}: cancelled Slurm job {cancelled} (its ranks checkpoint first); "
                          "waiting for the chain to end (a second signal stops waiting)")
            if len(got) > 1 and cancelled is not None:
                self._say(f"fleetmpi: not waiting any longer; Slurm job {cancelled} was cancelled; {self._resume_hint()}")
                return ExitCode.STOPPED
            if not chain:
                raise BadInput(f"{jd.root}: no Slurm job was submitted for this job dir")
            run = chain[-1]
            jid, restart = run["job_id"], run["restart"]
            code = chain_mod.read_exit(jd, jid, restart)
            try:
                state = squeue_states([jid]).get(jid, "GONE")
            except SlurmCommandError as e:
                state = "QUERY FAILED"
                self._say(f"fleetmpi: squeue failed, will ask again: {e}")
            label = f"exited {code}" if code is not None else state
            if shown.get((jid, restart)) != label:
                shown[(jid, restart)] = label
                self._say(f"fleetmpi: Slurm job {jid} (phase {run['phase']}, {run['shape']}): {label}")
            if state in ACTIVE_STATES or state == "QUERY FAILED":
                lost_since = None
            else:
                lost_since = lost_since or time.monotonic()
                allocation_lost = run.get("stop") == "lost"  # recorded by the continuation: nothing follows
                if cancelled is not None and code is None and time.monotonic() - lost_since > lost_grace_s:
                    # Cancelled before its batch shell ran (still pending): no end record follows.
                    self._say(f"fleetmpi: Slurm job {jid} was cancelled before it started; {self._resume_hint()}")
                    return ExitCode.STOPPED
                if allocation_lost or time.monotonic() - lost_since > lost_grace_s:
                    if allocation_lost:
                        what = (f"ended {state}: its allocation was lost; `fleetmpi submit {jd.root}` resumes "
                                "from the newest checkpoint")
                    elif code is not None:
                        what = "wrote its exit code but recorded no next step (its continuation failed)"
                    else:
                        what = "left the queue without writing its exit code (UNKNOWN)"
                    self._say(f"fleetmpi: Slurm job {jid} {what}; see {chain_mod.log_path(jd, jid)}")
                    return ExitCode.FAILED
            self.sleep(poll_s)

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def status_report(jd: JobDir) -> dict[str, Any]:
    """Return the job's status: state.json, then each Slurm run from its exit file, squeue, sacct."""
    state = jd.read_state()
    chain, end = runs(jd)
    detailed = chain_mod.run_states(jd, chain)
    status = state.get("status")
    if end is None and detailed and detailed[-1]["state"] == "UNKNOWN":
        status = "UNKNOWN"
    elif end is None and detailed and detailed[-1]["state"] not in ACTIVE_STATES | {"EXITED"}:
        status = f"SLURM_{detailed[-1]['state']}"
    for r in detailed:
        env = r.get("env") or {}
        r["allocation"] = {"nodes": env.get("SLURM_JOB_NUM_NODES"), "ntasks_per_node": env.get("SLURM_NTASKS_PER_NODE"),
                           "partition": env.get("SLURM_JOB_PARTITION"), "nodelist": env.get("SLURM_JOB_NODELIST"),
                           "gpus": env.get("SLURM_JOB_GPUS"), "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    return {"job_dir": str(jd.root), "status": status, "phase": state.get("phase"), "reason": state.get("reason"),
            "backend": state.get("backend"), "final_exit_code": end["exit_code"] if end else None,
            "timeouts": state.get("slurm_timeouts", 0), "preemptions": state.get("slurm_preemptions", 0),
            "chain": detailed, "model": str(jd.model) if jd.model.exists() else None}
