"""The one door to Slurm: every sbatch/squeue/sinfo/scontrol/scancel/sacct call goes through here.

A failed command raises :class:`SlurmCommandError` whose message shows the command, its
exit code and both streams. :func:`is_transient` and :func:`is_permanent_shape` sort the
failures that matter for submission; batched queries (squeue, sacct) live here too.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from fleetmpi.errors import FleetError, one_line

# Failures that go away by themselves: an overloaded or restarting controller, RPC rate
# limits, and per-user submit limits (the queue drains).
TRANSIENT = (
    "socket timed out", "unable to contact slurm controller", "resource temporarily unavailable",
    "temporarily unavailable", "slurm temporarily unable", "zero bytes were transmitted",
    "communication connection failure", "connection refused", "connection reset",
    "rate limit", "too many requests", "qosmaxsubmitjob", "maxsubmitjob", "job submit limit",
    "assocmaxsubmitjob", "backup controller in standby", "slurmctld not responding",
)
# Failures that no retry can fix: the cluster has no node of the requested shape.
PERMANENT_SHAPE = (
    "requested node configuration is not available", "node count specification invalid",
    "invalid generic resource", "invalid gres specification", "more processors requested than permitted",
    "invalid partition name specified", "memory specification can not be satisfied",
)
# squeue states of a job that may still run or is running.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT",
                           "RESV_DEL_HOLD", "STOPPED"})
# States in which Slurm ended a job because its allocation was lost, not by the job's
# doing. Processes left on such a node may still run for KillWait (a node set DOWN by
# an admin or a health check keeps its slurmd), and srun there exits 0.
LOST_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"})


class SlurmCommandError(FleetError):
    """A Slurm command failed; the message holds the command, exit code, stdout and stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 why: str = "") -> None:
        self.cmd, self.returncode, self.stdout, self.stderr = list(cmd), returncode, stdout, stderr
        status = f"exited {returncode}" if returncode is not None else why
        super().__init__(one_line(f"`{shlex.join(cmd)}` {status}; stdout: {stdout.strip()!r}; "
                                  f"stderr: {stderr.strip()!r}"))

    @property
    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}"


def run_slurm(cmd: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, timeout_s: float = 60.0,
              env: Mapping[str, str] | None = None) -> str:
    """Run one Slurm command; return its stdout or raise SlurmCommandError (missing binary too)."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=None if env is None else dict(env),
                              capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SlurmCommandError(cmd, None, "", "", f"cannot run: {cmd[0]!r} is not on PATH "
                                "(is this a Slurm login node? SLURM_CONF set?)") from None
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        # A command we gave up on may still have acted (sbatch): callers treat it as transient.
        raise SlurmCommandError(cmd, None, out, err + "\n(socket timed out: no answer within "
                                f"{timeout_s:g} s)", f"timed out after {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise SlurmCommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def is_transient(err: SlurmCommandError) -> bool:
    text = err.output.lower()
    return err.returncode is None or any(p in text for p in TRANSIENT)


def is_permanent_shape(err: SlurmCommandError) -> bool:
    text = err.output.lower()
    return any(p in text for p in PERMANENT_SHAPE)


def squeue_states(job_ids: Iterable[str | int]) -> dict[str, str]:
    """Return {job id: squeue state} for the ids squeue still knows, with ONE squeue call.

    Ids Slurm has forgotten (older than MinJobAge) are absent from the result.
    """
    ids = sorted({str(j) for j in job_ids}, key=lambda s: (len(s), s))
    if not ids:
        return {}
    cmd = ["squeue", "--noheader", "--states=all", "--jobs=" + ",".join(ids), "--format=%i|%T"]
    try:
        out = run_slurm(cmd)
    except SlurmCommandError as e:
        # squeue refuses a lone unknown id instead of printing nothing.
        if "invalid job id" in e.output.lower():
            return {}
        raise
    found: dict[str, str] = {}
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in ids:
            found[jid] = state.strip()
    return found


_ACCOUNTING_OFF: list[bool] = []


def sacct_states(job_ids: Iterable[str | int]) -> dict[str, tuple[str, int | None]]:
    """Return {job id: (state, exit code)} from accounting; {} where accounting is disabled."""
    ids = sorted({str(j) for j in job_ids})
    if not ids or _ACCOUNTING_OFF:
        return {}
    cmd = ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs=" + ",".join(ids),
           "--format=JobID,State,ExitCode"]
    try:
        out = run_slurm(cmd)
    except SlurmCommandError as e:
        if "accounting storage is disabled" in e.output.lower() or "is not on path" in str(e).lower():
            _ACCOUNTING_OFF.append(True)
            return {}
        raise
    found: dict[str, tuple[str, int | None]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0] in ids:
            code = parts[2].partition(":")[0]
            found[parts[0]] = (parts[1].split()[0] if parts[1] else "UNKNOWN",
                               int(code) if code.isdigit() else None)
    return found


class IdleNodes:
    """Idle node counts per partition from ``sinfo``, at most one call per ``min_interval_s``.

    :meth:`metrics` returns rule metrics: ``idle_nodes`` (distinct idle nodes) and
    ``idle_nodes[PARTITION]`` per partition. A failing sinfo gives the last values seen
    (or none), so a rule on them simply does not fire.
    """

    def __init__(self, min_interval_s: float = 30.0, clock: Callable[[], float] | None = None) -> None:
        self.min_interval_s = min_interval_s
        self._clock = clock or time.monotonic
        self._at: float | None = None
        self._values: dict[str, float] = {}
        self.calls = 0
        self.last_error: str | None = None

    def metrics(self) -> dict[str, float]:
        now = self._clock()
        if self._at is None or now - self._at >= self.min_interval_s:
            self._at = now
            self.calls += 1
            try:
                self._values = self._sample()
                self.last_error = None
            except SlurmCommandError as e:
                self.last_error = str(e)
        return dict(self._values)

    @staticmethod
    def _sample() -> dict[str, float]:
        out = run_slurm(["sinfo", "--noheader", "--Node", "--format=%N|%R|%t"], timeout_s=10.0)
        per: dict[str, set[str]] = {}
        idle: set[str] = set()
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 3:
                continue
            node, part, state = parts
            per.setdefault(part, set())
            # 'idle*' (not responding), 'idle~' (powered off), 'idle#' (powering up) cannot start a job now.
            if state == "idle":
                per[part].add(node)
                idle.add(node)
        values = {f"idle_nodes[{p}]": float(len(n)) for p, n in per.items()}
        values["idle_nodes"] = float(len(idle))
        return values


def retry_delay_s(attempt: int, backoff_s: float) -> float:
    """Return the wait before retry ``attempt`` (1-based): backoff doubled per try, at most 60 s."""
    return float(min(backoff_s * (2 ** (attempt - 1)), 60.0))
