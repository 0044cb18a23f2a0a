"""Python API over the ledger, mirroring the CLI (`fleetmpi submit / queue / sweep / status / cancel`).

>>> job = fleetmpi.submit("spec.yaml", overrides=["optimizer.lr=0.05"])   # starts now (local or Slurm)
>>> job.wait()                       # polls it until it ends
'COMPLETED'
>>> job.result().model               # or JobFailed with the reason
PosixPath('.../model.h5')
>>> later = fleetmpi.queue("spec.yaml")   # NEW in the ledger; a manager (or later.wait()) launches it

One world: every job is a ledger row, whether `fleetmpi run`, `fleetmpi submit`, ``submit``
or a manager started it (``register_started`` adds the first two), so `fleetmpi status`,
`cancel`, `report` and ``Job`` work on each by ledger id, name or job dir.
The CLI's commands call these functions, so both behave alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput, FleetError
from fleetmpi.jobdir import JobDir
from fleetmpi.jobs.backends import default_backends, last_metrics
from fleetmpi.jobs.ledger import ACTIVE, COMPLETED, NEW, TERMINAL, Ledger, QueueFull, home
from fleetmpi.jobs.manager import Manager, ManagerConfig, cancel_job, progress_fields
from fleetmpi.jobs.rows import JobRow
from fleetmpi.spec import Spec

__all__ = ["Job", "JobFailed", "Result", "job_record", "queue", "register_started", "submit", "sweep"]


class JobFailed(FleetError):
    """A job ended FAILED or CANCELLED; the message holds the reason and the log path."""

    def __init__(self, job_id: int, status: str, reason: str | None) -> None:
        super().__init__(f"job {job_id} {status}: {reason or 'no reason recorded'}")
        self.job_id, self.status, self.reason = job_id, status, reason


@dataclass(frozen=True)
class Result:
    """A completed job's model file and final metrics."""

    model: Path
    metrics: dict[str, Any]
    job_dir: Path
    target_met: bool | None = None   # None: the goal named no target, only a budget
    outcome: dict[str, Any] = field(default_factory=dict)   # state.json's outcome: outcome, reason, best_step...
    # The record `status --json` prints for the job dir (fleetmpi.jobs.summary.RECORD_KEYS):
    # exit_code, outcome, metrics, loss_meaning, chain of phases, under the same names.
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int | None:
        """Return the training's final exit code (0, or 5 for a target not met under require_target)."""
        code = self.record.get("exit_code")
        return int(code) if code is not None else None

    @property
    def chain(self) -> list[dict[str, Any]]:
        """Return the phases run, in order: phase, shape, ranks, job_id, exit_code."""
        return list(self.record.get("chain") or [])


class Job:
    """A job in the ledger, by id."""

    def __init__(self, job_id: int, ledger: Ledger | None = None, *, drive_all: bool = True) -> None:
        self.ledger = ledger or Ledger()
        self.id = int(job_id)
        # A queued job waits for any manager cycle; a submitted one is only polled (nothing else launched).
        self.drive_all = drive_all

    def __repr__(self) -> str:
        row = self.row()
        return f"<Job {self.id} {row.name} {row.status}>"

    def row(self) -> JobRow:
        return self.ledger.get(self.id)

    @property
    def name(self) -> str:
        return self.row().name

    @property
    def job_dir(self) -> Path:
        return Path(self.row().job_dir)

    def status(self) -> str:
        """Return the job's status (NEW, LAUNCHED, RUNNING, RESCALING, COMPLETED, FAILED, CANCELLED)."""
        return self.row().status

    def info(self) -> dict[str, Any]:
        """Return what `fleetmpi status JOB --json` prints."""
        return job_record(self.row())

    def wait(self, timeout: float | None = None, *, poll_s: float = 0.5, drive: bool = True) -> str:
        """Wait until the job is terminal and return its status; TimeoutError after ``timeout`` s.

        With ``drive`` (the default) this process runs manager cycles while it waits, so no
        separate `fleetmpi manager` is needed; one running as well does no harm.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        manager = Manager(self.ledger, ManagerConfig.resolve(), out=None) if drive else None
        while True:
            if manager is not None and (self.drive_all or self.status() == NEW):
                manager.cycle()
            elif manager is not None:
                manager.refresh([self.id])
            status = self.status()
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {status} after {timeout} s")
            time.sleep(poll_s)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the job; return its Result, or raise JobFailed with the reason."""
        status = self.wait(timeout)
        row = self.row()
        if status != COMPLETED:
            raise JobFailed(self.id, status, row.last_error)
        res = dict(row.result or {})
        jd = JobDir(row.job_dir)
        ended = jd.read_state().get("outcome")
        ended = ended if isinstance(ended, dict) else {}
        final: dict[str, Any] = ended["metrics"] if isinstance(ended.get("metrics"), dict) else {}
        skip = {"model", "metrics", "best_metrics", "targets_hit"}
        metrics = {**row.progress, **{k: v for k, v in res.items() if k not in skip}, **final}
        from fleetmpi.jobs.summary import job_summary
        return Result(model=Path(res.get("model") or jd.model), metrics=metrics, job_dir=Path(row.job_dir),
                      target_met=ended.get("target_met"), outcome=ended, record=job_summary(jd))

    def cancel(self) -> None:
        """Cancel the job (running ranks checkpoint first)."""
        cancel_job(self.ledger, self.id)


def _load(spec: Spec | str | Path, overrides: Sequence[str]) -> tuple[Spec, str]:
    from fleetmpi import spec as specmod
    if isinstance(spec, (str, Path)):
        return specmod.load(Path(spec), list(overrides)), str(Path(spec).resolve())
    if isinstance(spec, Spec):
        if not overrides:
            return spec, "<python Spec>"
        raw = specmod.apply_overrides(spec.plain(), list(overrides))
        return specmod.from_raw(raw, "<python Spec>", Path(spec._base_dir)), "<python Spec>"
    raise TypeError(f"spec must be a path or a fleetmpi.spec.Spec, not {type(spec).__name__}")


def _check_launchable(sp: Spec) -> None:
    """Refuse a job the manager could never start, before it enters the ledger."""
    from fleetmpi.launch.local import find_mpiexec
    from fleetmpi.preflight import check_inputs
    check_inputs(sp)
    backends = default_backends()
    if sp.scheduler.backend not in backends:
        raise BadInput(f"scheduler.backend {sp.scheduler.backend!r}: the manager has no such backend here "
                       f"(available: {', '.join(backends)})")
    if sp.scheduler.backend == "local":
        find_mpiexec(sp)
    elif sp.scheduler.backend == "slurm":
        from fleetmpi.launch.slurm.backend import SlurmBackend
        # sbatch --test-only on every phase's shape; the job dir named here is never made.
        SlurmBackend(JobDir(home() / "jobs" / ".preflight"), sp).preflight()


def _enqueue(ledger: Ledger, sp: Spec, spec_path: str, job_dir: Path | str | None, max_queued: int | None) -> Job:
    from fleetmpi import spec as specmod

    def make_dir(job_id: int) -> str:
        root = Path(job_dir) if job_dir else home() / "jobs" / f"{job_id:06d}-{sp.name}"
        root = root.expanduser().resolve()
        jd = JobDir(root)
        if jd.exists():
            raise BadInput(f"{root}: already holds a job; pass a new --job-dir")
        jd.create(specmod.dump(sp), sp.fleet.start, sp.scheduler.backend)
        return str(root)

    notify = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(n).items()}
              for n in sp.notify]
    job_id = ledger.add_job(name=sp.name, spec_path=spec_path, spec_hash=sp.spec_hash(), backend=sp.scheduler.backend,
                            phase=sp.fleet.start, shape=sp.phase(sp.fleet.start).shape(),
                            max_attempts=sp.retry.max_attempts, backoff_s=sp.retry.backoff_s, notify=notify,
                            make_dir=make_dir, max_queued=max_queued)
    return Job(job_id, ledger)


def queue(spec: Spec | str | Path, *, overrides: Sequence[str] = (), job_dir: Path | str | None = None,
          ledger: Ledger | None = None, max_queued: int | None = None) -> Job:
    """Register a job (status NEW) for a manager to launch; return at once (CLI: `fleetmpi queue`)."""
    sp, spec_path = _load(spec, overrides)
    _check_launchable(sp)
    cfg = ManagerConfig.resolve(max_queued=max_queued)
    return _enqueue(ledger or Ledger(), sp, spec_path, job_dir, cfg.max_queued)


def submit(spec: Spec | str | Path, *, overrides: Sequence[str] = (), job_dir: Path | str | None = None,
           backend: str | None = None, ledger: Ledger | None = None) -> Job:
    """Start a job now on the spec's backend (local or Slurm); return its handle (status/wait/result/cancel).

    Like `fleetmpi run` / `fleetmpi submit` it does not wait for a free slot: the manager's
    ``max_running`` does not hold it back. ``backend`` overrides ``scheduler.backend``.
    """
    sets = [*overrides, *([f"scheduler.backend={backend}"] if backend else [])]
    sp, spec_path = _load(spec, sets)
    _check_launchable(sp)
    ledger = ledger or Ledger()
    job = _enqueue(ledger, sp, spec_path, job_dir, None)
    Manager(ledger, ManagerConfig.resolve(), out=None).launch(job.row(), max_running=None)
    row = job.row()
    if row.status in TERMINAL:   # the launch failed for good (a transient failure leaves it NEW: wait() retries)
        raise JobFailed(job.id, row.status, row.last_error)
    return Job(job.id, ledger, drive_all=False)


def register_started(jd: JobDir, sp: Spec, *, backend: str, backend_id: str, info: dict[str, Any],
                     log: str | None, by: str) -> tuple[Ledger, int, int] | None:
    """Record a job that `fleetmpi run` or `fleetmpi submit` just started, so the ledger lists it.

    Returns (ledger, job id, allocation id), or None when the job dir already has an active
    ledger job (the manager launched this runner) or the ledger cannot be written (a warning:
    training never waits on the ledger). The row gets ``max_attempts`` 1: nobody relaunches
    a job a person started; `fleetmpi run JOB_DIR` again reopens that row (a new attempt).
    """
    import sqlite3
    import sys

    root = str(jd.root.resolve())
    try:
        ledger = Ledger()
        mine = [r for r in ledger.jobs() if Path(r.job_dir).resolve() == Path(root)]
        if any(r.status in (NEW, *ACTIVE) for r in mine):
            return None
        if mine:   # the dir ran before and its row ended: this run continues that row
            job_id = mine[-1].id
            ledger.reopen(job_id, by, time.time())
        else:
            ph = sp.phase(str(jd.read_state().get("phase") or sp.fleet.start))
            notify = [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(n).items()}
                      for n in sp.notify]
            job_id = ledger.add_job(name=sp.name, spec_path=str(jd.spec), spec_hash=sp.spec_hash(), backend=backend,
                                    phase=str(jd.read_state().get("phase") or sp.fleet.start), shape=ph.shape(),
                                    max_attempts=1, backoff_s=0.0, notify=notify, make_dir=lambda _id: root)
            ledger.claim(job_id, by, time.time())
        state = ledger.get(job_id)
        alloc = ledger.add_allocation(job_id, attempt=state.attempts, backend=backend, backend_id=backend_id,
                                      host=info.get("host"), phase=state.phase, shape=state.shape, log=log, info=info)
        return ledger, job_id, alloc
    except (OSError, sqlite3.Error, FleetError) as e:
        print(f"fleetmpi: warning: not recorded in the ledger ({e}); `fleetmpi status {jd.root}` still works",
              file=sys.stderr)
        return None


def grid_points(grid: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Expand ``key=v1,v2`` items into the cartesian product of (key, value) assignments."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or any(not v for v in values.split(",")):
            raise BadInput(f"--grid {item!r}: expected key.path=v1,v2,..., e.g. --grid optimizer.lr=0.1,0.05")
        axes.append([(key, v) for v in values.split(",")])
    keys = [a[0][0] for a in axes]
    if len(set(keys)) != len(keys):
        raise BadInput(f"--grid names a key twice: {', '.join(keys)}")
    return [list(p) for p in itertools.product(*axes)]


def _suffixes(points: list[list[tuple[str, str]]]) -> list[str]:
    """Return readable name suffixes ('lr0.1-batch50'), or g000... when those collide or run long."""
    readable = ["-".join(re.sub(r"[^A-Za-z0-9_.-]", "", k.split(".")[-1] + v) for k, v in p) for p in points]
    if len(set(readable)) == len(readable) and all(0 < len(r) <= 40 for r in readable):
        return readable
    width = len(str(len(points) - 1))
    return [f"g{i:0{width}d}" for i in range(len(points))]


def sweep(spec: Spec | str | Path, grid: Sequence[str], *, overrides: Sequence[str] = (),
          ledger: Ledger | None = None, max_queued: int | None = None) -> list[Job]:
    """Queue one NEW job per point of the grid's cartesian product, named NAME-SUFFIX.

    Every point is validated before any is queued, so a bad value queues nothing.
    """
    base, _ = _load(spec, overrides)
    points = grid_points(grid)
    loaded = []
    for point, suffix in zip(points, _suffixes(points)):
        sets = [*overrides, *(f"{k}={v}" for k, v in point), f"name={base.name}-{suffix}"]
        loaded.append(_load(spec, sets))
    for sp, _ in loaded:
        _check_launchable(sp)
    cfg = ManagerConfig.resolve(max_queued=max_queued)
    ledger = ledger or Ledger()
    waiting = len([j for j in ledger.jobs([NEW]) if j.owner == _owner()])
    if waiting + len(loaded) > cfg.max_queued:
        raise QueueFull(f"a sweep of {len(loaded)} jobs on top of {waiting} queued exceeds max_queued "
                        f"{cfg.max_queued} (--max-queued or FLEETMPI_MAX_QUEUED)")
    return [_enqueue(ledger, sp, path, None, cfg.max_queued) for sp, path in loaded]


def _owner() -> str:
    import getpass
    return getpass.getuser()


def job_record(job: JobRow, live: bool = True) -> dict[str, Any]:
    """Return a job's status record: the ledger row plus, while active, its last metrics line."""
    prog = dict(job.progress)
    if live and job.status in ACTIVE:
        prog.update(progress_fields(last_metrics(JobDir(job.job_dir).metrics)))
    return {"id": job.id, "name": job.name, "status": job.status, "phase": prog.get("phase") or job.phase,
            "shape": job.shape, "ranks": prog.get("ranks"), "step": prog.get("step"), "epoch": prog.get("epoch"),
            "loss": prog.get("loss"), "valid_loss": prog.get("valid_loss"),
            "sync_bytes_per_step": prog.get("sync_bytes_per_step"), "sync_bytes_total": prog.get("sync_bytes_total"),
            "attempts": job.attempts, "failures": job.failures, "age_s": time.time() - job.created,
            "backend": job.backend, "reason": job.last_error, "job_dir": job.job_dir, "result": job.result}
