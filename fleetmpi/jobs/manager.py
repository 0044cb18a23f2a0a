"""The job manager: launch NEW jobs, poll allocations, fold job dirs in, retry, notify.

One cycle (``fleetmpi manager --once``; the loop repeats it, sleeping 2 s after a cycle
that changed something and doubling up to 60 s while nothing does):

1. poll every live allocation with ONE ``poll`` call per backend;
2. fold new lines of each active job's ``events.jsonl`` into the ledger (phase, status);
3. classify each allocation that ended and record the job's next status;
4. claim and launch NEW jobs whose wait is over, within the owner's max-running limit;
5. deliver due notifications.

Several managers may run at once (a loop, cron ``--once`` runs, ``Job.wait``): every
change is a compare-and-set in the ledger, so a job is launched once per attempt and an
ended allocation is handled once.

Retry layers, exactly one per failure class:

* infrastructure lost under a running job (allocation NODE_FAIL, BOOT_FAIL, PREEMPTED or
  LOST; a rank killed by a signal, locally or under Slurm; local exit 4, stopped after a
  checkpoint) -- this manager, and only it: back to NEW after ``retry.backoff_s`` and
  relaunched from the newest checkpoint, until ``retry.max_attempts`` attempts failed.
  ``fleetmpi run``, LocalBackend and the worker never retry. Under Slurm the batch job is
  ``--no-requeue`` (unless ``scheduler.requeue``), so Slurm does not requeue it as well,
  and a chain whose allocation Slurm ended as lost neither ends nor resubmits itself.
* a launch that failed transiently (:class:`TransientLaunchError`: a Slurm command
  timed out or was refused for load) -- this manager, counted like the above. Launches it
  makes use one sbatch try each (``submit_attempts=1``), so launch.slurm.submit's own retry
  loop does not run under it; the submission key makes a retry adopt a job that a
  timed-out sbatch did create.
* stops and continuations inside a Slurm chain (time limit, preemption signal, rescale)
  -- the chain itself (fleetmpi.launch.slurm.backend: resubmit/requeue within
  ``scheduler.max_timeouts`` / ``max_preemptions``, sbatch retries within
  ``scheduler.submit_attempts``), because no manager runs inside an allocation. When the
  chain gives up (STOPPED, or FAILED "could not resubmit"), this manager does not retry
  again: FAILED with the chain's reason.
* continuation seen by the manager (TIMEOUT with a checkpoint; exit 3, a rescale the
  allocation did not start itself) -- relaunched at once, not counted as a failure.
* algorithmic (exit 1 such as a NaN loss, exit 2 bad input, OUT_OF_MEMORY, TIMEOUT before
  any checkpoint) -- no retry: FAILED with the reason and the log path.
* cancelled (by `fleetmpi cancel`, or outside fleetmpi: scancel) -- never retried.
* notifier failures -- delivery is retried here, bounded (``notify_tries``, backoff
  doubling from ``notify_backoff_s``), and never changes the job's status.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from fleetmpi.errors import BadInput, ExitCode, FleetError, one_line
from fleetmpi.jobdir import JobDir
from fleetmpi.jobs import notify
from fleetmpi.jobs.backends import AllocState, Backend, TransientLaunchError, default_backends, last_metrics, read_events
from fleetmpi.jobs.ledger import ACTIVE, CANCELLED, COMPLETED, FAILED, NEW, TERMINAL, Ledger
from fleetmpi.jobs.rows import AllocRow, JobRow


class Outcome(StrEnum):
    """What the manager does about an allocation that ended (see the module doc)."""

    DONE = "done"                   # COMPLETED
    CONTINUATION = "continue"       # back to NEW at once, not a failure (rescale, time limit after a checkpoint)
    RETRY = "retry"                 # back to NEW after the backoff while attempts remain
    FAIL = "fail"                   # FAILED with the reason: retrying cannot help
    EXTERNAL_CANCEL = "cancelled"   # CANCELLED outside fleetmpi (scancel)


TRANSIENT_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "LOST", "DEADLINE"})


@dataclass(frozen=True)
class ManagerConfig:
    """Manager settings. Precedence: CLI flag > $FLEETMPI_* environment > these defaults."""

    max_running: int = 4
    max_queued: int = 1000
    poll_min_s: float = 2.0
    poll_max_s: float = 60.0
    notify_tries: int = 5
    notify_backoff_s: float = 10.0
    launch_grace_s: float = 120.0

    @classmethod
    def resolve(cls, **flags: Any) -> ManagerConfig:
        """Resolve once: flags (None means unset) > FLEETMPI_<NAME> > defaults; BadInput names the source."""
        values: dict[str, Any] = {}
        for name, default in cls.__dataclass_fields__.items():
            kind: type[int] | type[float] = type(default.default)  # type: ignore[assignment]
            env = f"FLEETMPI_{name.upper()}"
            if flags.get(name) is not None:
                raw, source = flags.pop(name), f"--{name.replace('_', '-')}"
            elif os.environ.get(env):
                raw, source = os.environ[env], env
            else:
                flags.pop(name, None)
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise BadInput(f"{source}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
            need = ">= 1" if kind is int else ("> 0" if name == "poll_min_s" else ">= 0")
            if value < (1 if kind is int else 0) or (name == "poll_min_s" and value == 0):
                raise BadInput(f"{source}={raw!r}: expected a number {need}")
            values[name] = value
        if flags:
            raise TypeError(f"unknown manager setting(s) {sorted(flags)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**values)
        if cfg.poll_max_s < cfg.poll_min_s:
            raise BadInput(f"poll_max_s {cfg.poll_max_s} is below poll_min_s {cfg.poll_min_s}")
        return cfg


def _run_outcome(jd: JobDir) -> dict[str, Any] | None:
    """Return the outcome the run wrote to state.json when it ended (target_met, metrics...), else None."""
    try:
        out = jd.read_state().get("outcome")
    except FleetError:
        return None
    return out if isinstance(out, dict) else None


def classify(st: AllocState, has_checkpoint: bool) -> tuple[Outcome, str]:
    """Return (outcome, reason) for an allocation that ended; outcomes as in the module doc."""
    code, detail = st.exit_code, f": {st.detail}" if st.detail else ""
    if st.state == "TIMEOUT":
        if has_checkpoint:
            return Outcome.CONTINUATION, "time limit reached; continuing from the newest checkpoint"
        return Outcome.FAIL, f"time limit reached before any checkpoint{detail}; raise the phase's time_min"
    if st.state in TRANSIENT_STATES:
        return Outcome.RETRY, f"allocation {st.state}{detail}"
    if st.state == "CHAIN_STOPPED":
        return Outcome.FAIL, f"stopped, and the Slurm chain's own resubmissions gave up{detail}"
    if st.state == "CANCELLED":
        return Outcome.EXTERNAL_CANCEL, f"allocation cancelled outside fleetmpi{detail}"
    if st.state == "OUT_OF_MEMORY":
        return Outcome.FAIL, f"out of memory{detail}; raise the phase's mem_gb"
    if code is None:
        return Outcome.RETRY, f"allocation {st.state} without an exit code{detail}"
    known = ExitCode.of(code)
    if known is ExitCode.OK:
        return Outcome.DONE, "goal reached"
    if known is ExitCode.TARGET_MISSED:   # the run ended as asked; retrying would repeat it
        return Outcome.FAIL, f"target not met (goal.require_target){detail}"
    if known is ExitCode.RESCALE:
        return Outcome.CONTINUATION, "rescale: continuing in the next phase"
    if known is ExitCode.STOPPED:
        return Outcome.RETRY, f"stopped by a signal after a checkpoint (exit {code}){detail}"
    if known in (ExitCode.FAILED, ExitCode.BAD_INPUT):
        return Outcome.FAIL, f"exit code {code} ({known.meaning}){detail}"
    return Outcome.RETRY, f"a rank was killed or crashed (exit code {code}){detail}"


@dataclass
class CycleReport:
    """What one cycle did; ``polls`` counts poll calls per backend."""

    polls: dict[str, int] = field(default_factory=dict)
    polled: int = 0
    folded: int = 0
    ended: int = 0
    launched: int = 0
    notified: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.folded or self.ended or self.launched or self.notified)


# The manager copies the ledger this often (seconds) and keeps this many copies
# ($FLEETMPI_HOME/backups/); `fleetmpi ledger rebuild` recovers without them.
BACKUP_EVERY_S = 3600.0
BACKUP_KEEP = 24


class Manager:
    """Drive the ledger's jobs through their backends (see the module doc for one cycle)."""

    def __init__(self, ledger: Ledger, config: ManagerConfig | None = None,
                 backends: Mapping[str, Backend] | None = None, out: TextIO | None = sys.stderr) -> None:
        self.ledger = ledger
        self.config = config or ManagerConfig.resolve()
        self.backends = dict(backends if backends is not None else default_backends())
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.out = out
        self._warned: set[str] = set()
        self._checked = False   # the ledger's integrity_check passed (once, before the first cycle acts)

    def say(self, line: str) -> None:
        if self.out is not None:
            print(f"fleetmpi manager: {line}", file=self.out, flush=True)

    # -- one cycle ------------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        if not self._checked:   # damage found half-way through a cycle would leave launches unrecorded
            self.ledger.check()
            self._checked = True
        rep = CycleReport()
        live = self.ledger.allocations(live=True)
        states: dict[int, AllocState] = {}
        by_backend: dict[str, list[AllocRow]] = {}
        for a in live:
            by_backend.setdefault(a.backend, []).append(a)
        for name, allocs in by_backend.items():
            backend = self.backends.get(name)
            if backend is None:
                self._warn(name, f"no {name} backend here; {len(allocs)} allocation(s) are not polled")
                continue
            rep.polls[name] = rep.polls.get(name, 0) + 1
            try:
                found = backend.poll(allocs)
            except FleetError as e:
                self.say(f"poll of {name} failed (will try again): {e}")
                continue
            rep.polled += len(allocs)
            states.update({a.id: found[a.backend_id] for a in allocs if a.backend_id in found})
        jobs = {j.id: j for j in self.ledger.jobs(ACTIVE)}
        for a in live:
            if a.id in states and a.job_id not in jobs:
                jobs[a.job_id] = self.ledger.get(a.job_id)
        for job in jobs.values():
            rep.folded += self._fold(job)
        for a in live:
            st = states.get(a.id)
            if st is None:
                continue
            if st.ended:
                rep.ended += self._handle_end(a, st)
            elif st.state != a.state:
                self.ledger.set_allocation_state(a.id, st.state)
        self._reap_interrupted_launches()
        rep.launched = self._launch_due()
        rep.notified = self._deliver_notes()
        self._backup_if_due()
        return rep

    def _backup_if_due(self) -> None:
        """Keep a rolling copy of the ledger: one per BACKUP_EVERY_S, the newest BACKUP_KEEP (cron --once too)."""
        age = self.ledger.newest_backup_age_s()
        if age is None or age >= BACKUP_EVERY_S:
            try:
                self.ledger.backup(keep=BACKUP_KEEP)
            except OSError as e:   # a full disk must not stop the jobs; say it once
                self._warn("backup", f"ledger backup failed (jobs go on): {e}")

    def _fold(self, job: JobRow) -> int:
        """Fold new whole lines of the job's events.jsonl into the ledger; return how many."""
        jd = JobDir(job.job_dir)
        try:
            if jd.events.stat().st_size <= job.events_offset:
                return 0
        except FileNotFoundError:
            return 0
        events, end = read_events(jd.events, job.events_offset)
        progress = progress_fields(last_metrics(jd.metrics))
        if end == job.events_offset or not self.ledger.fold(job.id, job.events_offset, end, events, progress):
            return 0
        return len(events)

    def _handle_end(self, a: AllocRow, st: AllocState) -> int:
        job = self.ledger.get(a.job_id)
        jd = JobDir(job.job_dir)
        outcome, reason = classify(st, any(jd.ckpt.glob("step-*.h5")))
        progress = progress_fields(last_metrics(jd.metrics)) or job.progress
        values: dict[str, Any] = {"progress": progress}
        ended = _run_outcome(jd)
        if ended is not None and outcome in (Outcome.DONE, Outcome.FAIL):
            # The run's own outcome (target_met, final metrics) is the job's result, and its line the reason.
            values["result"] = {**(job.result or {}), **ended, "model": str(jd.model)}
            if ExitCode.of(st.exit_code or 0) is ExitCode.TARGET_MISSED:
                reason = str(ended.get("reason") or reason)
        now = time.time()
        to: str | None
        why: str | None
        if outcome is Outcome.DONE:
            to, why = COMPLETED, None
        elif outcome is Outcome.CONTINUATION:
            to, why = NEW, None
            values["not_before"] = now
        elif outcome is Outcome.RETRY and job.failures + 1 < job.max_attempts:
            to, why = NEW, f"attempt {a.attempt} (retry {job.failures + 1} of {job.max_attempts - 1}): {reason}"
            values.update(failures=job.failures + 1, not_before=now + job.backoff_s)
        elif outcome is Outcome.RETRY:
            to, why = FAILED, f"gave up after {job.failures + 1} failed attempts; last: {reason}; log: {a.log}"
            values["failures"] = job.failures + 1
        elif outcome is Outcome.EXTERNAL_CANCEL:
            to, why = CANCELLED, reason
        else:
            to, why = FAILED, f"{reason}; log: {a.log}"
        if job.status in TERMINAL:
            to = None  # e.g. cancelled by the user: only the allocation's end is recorded
        if not self.ledger.end_allocation(a.id, state=st.state, exit_code=st.exit_code, reason=reason,
                                          job_to=to, job_reason=why, **(values if to else {})):
            return 0
        if to is not None:
            self.say(f"job {job.id} ({job.name}) attempt {a.attempt}: {st.state} exit {st.exit_code} -> {to}"
                     + (f" ({why})" if why else ""))
        return 1

    def _reap_interrupted_launches(self) -> None:
        """Send back to NEW a job claimed by a manager that died before it recorded the launch."""
        cutoff = time.time() - self.config.launch_grace_s
        live = {a.job_id for a in self.ledger.allocations(live=True)}
        for job in self.ledger.jobs(["LAUNCHED"]):
            if job.updated < cutoff and job.id not in live:
                self.ledger.transition(job.id, NEW, expect=["LAUNCHED"], reason="launch interrupted",
                                       not_before=time.time())

    def _launch_due(self) -> int:
        return sum(self.launch(job) for job in self.ledger.launchable(time.time()))

    def launch(self, job: JobRow, max_running: int | None = -1) -> bool:
        """Claim and launch one NEW job now; return whether it was launched (see the ledger for why not)."""
        backend = self.backends.get(job.backend)
        if backend is None:
            self._warn(job.backend, f"no {job.backend} backend here; job {job.id} waits")
            return False
        cap = self.config.max_running if max_running == -1 else max_running
        if not self.ledger.claim(job.id, self.id, time.time(), cap):
            return False
        attempt = job.attempts + 1
        try:
            got = backend.launch(job, attempt)
        except TransientLaunchError as e:
            self._launch_failed(job, attempt, e, transient=True)
            return False
        except (FleetError, OSError) as e:
            self._launch_failed(job, attempt, e, transient=False)
            return False
        self.ledger.add_allocation(job.id, attempt=attempt, backend=backend.name, backend_id=got.backend_id,
                                   host=got.host, phase=job.phase, shape=job.shape, log=got.log, info=got.info)
        self.say(f"launched job {job.id} ({job.name}) attempt {attempt} on {backend.name}: {got.backend_id}")
        return True

    def refresh(self, job_ids: Iterable[int] | None = None) -> int:
        """Poll live allocations, fold job dirs and record ends, launching nothing; return the ends recorded.

        What `fleetmpi status` and a handle's ``wait`` do, so jobs started by `run` or `submit`
        show their true state without a manager running.
        """
        wanted = None if job_ids is None else set(job_ids)
        live = [a for a in self.ledger.allocations(live=True) if wanted is None or a.job_id in wanted]
        by_backend: dict[str, list[AllocRow]] = {}
        for a in live:
            by_backend.setdefault(a.backend, []).append(a)
        states: dict[int, AllocState] = {}
        for name, allocs in by_backend.items():
            backend = self.backends.get(name)
            if backend is None:
                continue
            try:
                found = backend.poll(allocs)   # a local runner on another host stays UNKNOWN, not ended
            except FleetError:
                continue   # a scheduler that does not answer now: the next look asks again
            states.update({a.id: found[a.backend_id] for a in allocs if a.backend_id in found})
        ended = 0
        for job in {a.job_id: self.ledger.get(a.job_id) for a in live}.values():
            self._fold(job)
        for a in live:
            st = states.get(a.id)
            if st is not None and st.ended:
                ended += self._handle_end(a, st)
        return ended

    def record_end(self, a: AllocRow, st: AllocState) -> int:
        """Fold the job dir and record how allocation ``a`` ended (the runner that knows says so itself)."""
        self._fold(self.ledger.get(a.job_id))
        return self._handle_end(a, st)

    def _launch_failed(self, job: JobRow, attempt: int, err: Exception, transient: bool) -> None:
        reason = f"launch of attempt {attempt} failed: {one_line(err)}"
        if transient and job.failures + 1 < job.max_attempts:
            self.ledger.transition(job.id, NEW, expect=["LAUNCHED"], reason=reason, failures=job.failures + 1,
                                   not_before=time.time() + job.backoff_s)
        else:
            self.ledger.transition(job.id, FAILED, expect=["LAUNCHED"], reason=reason, failures=job.failures + 1)
        self.say(f"job {job.id} ({job.name}): {reason}")

    def _deliver_notes(self) -> int:
        sent = 0
        now = time.time()
        for note in self.ledger.claim_notes(self.id, now):
            job = self.ledger.get(note.job_id)
            payload = {"job": job.id, "name": job.name, "status": note.status, "reason": note.reason or "",
                       "event": note.on_event, "job_dir": job.job_dir, "phase": job.phase, "attempts": job.attempts,
                       "result": job.result, "t": now,
                       "target_met": (job.result or {}).get("target_met"),
                       "outcome": (job.result or {}).get("outcome")}
            try:
                notify.deliver(note.kind, note.target, payload)
            except notify.NotifyError as e:
                last = note.tries >= self.config.notify_tries
                retry_at = None if last else now + self.config.notify_backoff_s * 2 ** (note.tries - 1)
                self.ledger.finish_note(note.id, error=str(e), retry_at=retry_at)
                self.say(f"notify {note.kind} for job {job.id} failed (try {note.tries} of "
                         f"{self.config.notify_tries}{', giving up' if last else ''}): {e}")
                continue
            self.ledger.finish_note(note.id)
            sent += 1
        return sent

    def _warn(self, key: str, line: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.say(line)

    # -- the loop -------------------------------------------------------------------------
    def run(self, *, until_idle: bool = False, stop: Callable[[], bool] = lambda: False) -> None:
        """Cycle until ``stop()`` (or, with ``until_idle``, until the ledger has nothing left)."""
        interval = self.config.poll_min_s
        while not stop():
            rep = self.cycle()
            if until_idle and self.ledger.idle():
                return
            interval = next_interval(interval, rep.changed, self.config)
            # Wake up for a retry that falls due before the interval is over.
            now = time.time()
            due = self.ledger.next_due(now)
            wait = interval if due is None else max(min(interval, due - now), self.config.poll_min_s)
            deadline = time.monotonic() + wait
            while not stop() and time.monotonic() < deadline:
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


def next_interval(interval: float, changed: bool, config: ManagerConfig) -> float:
    """Return the poll interval after a cycle: the minimum after a change, else doubled up to the maximum."""
    return config.poll_min_s if changed else min(interval * 2, config.poll_max_s)


def progress_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields of a metrics line that `fleetmpi status` shows."""
    keep = ("step", "epoch", "loss", "valid_loss", "phase", "ranks", "sync_bytes_per_step", "sync_bytes_total", "t")
    return {k: rec[k] for k in keep if k in rec}


def cancel_job(ledger: Ledger, ref: str | int, backends: Mapping[str, Backend] | None = None) -> JobRow:
    """Mark a job CANCELLED and stop each of its live allocations (local: SIGTERM to its group).

    The ranks checkpoint and exit 4; a later manager cycle records the allocations' end.
    """
    job = ledger.find(ref)
    if job.status in TERMINAL:
        raise BadInput(f"job {job.id} ({job.name}) is already {job.status}; nothing to cancel")
    if not ledger.transition(job.id, CANCELLED, expect=[NEW, *ACTIVE], reason="cancelled by the user"):
        raise BadInput(f"job {job.id} ({job.name}) ended while being cancelled: {ledger.get(job.id).status}")
    backends = backends if backends is not None else default_backends()
    for a in ledger.allocations(job.id, live=True):
        backend = backends.get(a.backend)
        if backend is None:
            raise FleetError(f"job {job.id}: no {a.backend} backend here to cancel allocation {a.backend_id}")
        backend.cancel(a)
        ledger.add_event(job.id, "cancel_sent", allocation=a.id, backend_id=a.backend_id)
    return ledger.get(job.id)
