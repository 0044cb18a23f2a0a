"""Submit one batch script to Slurm exactly once, through transient failures.

Every submission carries a key (``--comment``) unique to its intent: (job dir, position in
the chain). The intent is recorded before the first sbatch; before every retry (and before
a first try of a key some earlier process recorded), squeue is asked for a job with that
key, so a retry after a timed-out sbatch that did create the job adopts that job instead of
making a second one. Jobs are submitted held and released after the caller recorded them: a job never
starts (and writes the job dir) before its submission is written down, and a job whose
sbatch answer was lost cannot run away before it is found.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fleetmpi.errors import BadInput, ExitCode, FleetError
from fleetmpi.launch.slurm.cmd import ACTIVE_STATES, SlurmCommandError, is_permanent_shape, is_transient, retry_delay_s, run_slurm

KEY_PREFIX = "fleetmpi."


class SubmissionError(FleetError):
    """Slurm did not take a job (after retries where the failure was transient)."""

    exit_code = 1


class ShapeUnavailable(SubmissionError, BadInput):
    """The cluster has no node of the shape a phase asks for; no retry can help."""

    exit_code = ExitCode.BAD_INPUT


OnRetry = Callable[[int, str, float], None]   # (attempt that failed, error text, seconds to wait)


def submission_key(uid: str, index: int) -> str:
    """Return the key of the ``index``-th submission of the job with ``uid`` (sbatch --comment)."""
    return f"{KEY_PREFIX}{uid}.{index}"


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def find_by_key(key: str, job_name: str) -> str | None:
    """Return the id of a live job that carries ``key``, or None; raises SlurmCommandError."""
    out = run_slurm(["squeue", "--noheader", "--states=all", f"--user={_user()}", f"--name={job_name}",
                     "--format=%i|%T|%k"])
    for line in out.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[2] == key and parts[1] in ACTIVE_STATES:
            return parts[0]
    return None


def _retrying(what: str, fn: Callable[[], str], attempts: int, backoff_s: float, shape: str,
              on_retry: OnRetry | None, sleep: Callable[[float], None]) -> str:
    """Run ``fn`` until it succeeds, retrying transient Slurm failures with backoff."""
    last: SlurmCommandError | None = None
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except SlurmCommandError as e:
            if is_permanent_shape(e):
                raise ShapeUnavailable(f"Slurm has no node for {shape}: {e}") from None
            if not is_transient(e):
                raise SubmissionError(f"{what} failed for {shape} (not a transient error, not retried): {e}") from None
            last = e
            if attempt < attempts:
                wait = retry_delay_s(attempt, backoff_s)
                if on_retry:
                    on_retry(attempt, str(e), wait)
                sleep(wait)
    raise SubmissionError(f"{what} failed {attempts} times for {shape} (transient errors; "
                          f"scheduler.submit_attempts={attempts}); last: {last}")


def submit_held(script: Path, *, cwd: Path, key: str, job_name: str, shape: str, attempts: int,
                backoff_s: float, on_retry: OnRetry | None = None,
                sleep: Callable[[float], None] = time.sleep, look_first: bool = True,
                env: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Submit ``script`` held, once per ``key``; return (job id, whether an existing job was adopted).

    ``look_first=False`` skips the squeue lookup before the first try, for a key that no
    process has tried to submit before (the caller recorded its intent first). ``env``:
    sbatch's environment, which the job inherits (default this process's).
    """
    adopted = [False]
    tries = [0]

    def once() -> str:
        # Ask before every retry (and before the first try of a key tried before): an
        # earlier try, ours or a crashed process's, may have created the job although its
        # sbatch reported a failure.
        tries[0] += 1
        found = find_by_key(key, job_name) if (look_first or tries[0] > 1) else None
        if found:
            adopted[0] = True
            return found
        out = run_slurm(["sbatch", "--parsable", "--hold", str(script.resolve())], cwd=cwd, env=env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmissionError(f"sbatch --parsable answered {out.strip()!r}; expected a job id")
        return job_id

    job_id = _retrying("sbatch", once, attempts, backoff_s, shape, on_retry, sleep)
    return job_id, adopted[0]


def release(job_id: str, *, shape: str, attempts: int, backoff_s: float, on_retry: OnRetry | None = None,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Release a held job (harmless on a job that is not held)."""
    _retrying(f"scontrol release {job_id}", lambda: run_slurm(["scontrol", "release", job_id]),
              attempts, backoff_s, shape, on_retry, sleep)


def dry_run(script: Path, *, cwd: Path, shape: str, attempts: int, backoff_s: float,
              sleep: Callable[[float], None] = time.sleep) -> None:
    """Ask Slurm whether it could ever run ``script`` (sbatch --test-only; creates no job)."""
    _retrying("sbatch --test-only", lambda: run_slurm(["sbatch", "--test-only", str(script.resolve())], cwd=cwd),
              attempts, backoff_s, shape, None, sleep)


def cancel(job_id: str) -> None:
    """Cancel a job; errors are the caller's to show."""
    run_slurm(["scancel", job_id])


def requeue(job_id: str, *, shape: str, attempts: int, backoff_s: float,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Put a running job back in the queue (``scontrol requeue``); it keeps its id."""
    _retrying(f"scontrol requeue {job_id}", lambda: run_slurm(["scontrol", "requeue", job_id]),
              attempts, backoff_s, shape, None, sleep)
