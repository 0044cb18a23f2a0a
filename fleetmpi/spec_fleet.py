"""The spec's run side: where and how a job runs, apart from what it trains.

Phase shapes and their bounds (Slurm's time formats included), the rules that move a
job between phases, the scheduler, retries, notifications, and whether a local fleet
fits this machine. ``fleetmpi.spec`` composes these sections into the job spec and
re-exports every public name here, so callers keep importing from ``fleetmpi.spec``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from fleetmpi.errors import BadInput, quote
from fleetmpi.schema import check, identifier, in_range, non_negative, positive, positive_at_most, sbatch_extra_option

if TYPE_CHECKING:
    from fleetmpi.spec import Spec


# Bounds on a phase, checked for every phase at load, not when the phase is reached.
MAX_NODES = 10_000           # the largest clusters have ~10k nodes; more is a typo
MAX_RANKS_PER_NODE = 1024    # the largest nodes have 192-384 cores (768 threads); more is a typo
MAX_RANKS = 1 << 20          # nodes x ranks_per_node: more ranks than any machine has run
MAX_GPUS_PER_NODE = 64       # nodes carry 4-16 GPUs
MAX_MEM_GB = 65536.0         # 64 TiB: the largest shared-memory nodes
MAX_TIME_MIN = 525_600       # one year; Slurm partitions allow days to weeks


# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds round up to a minute, as sbatch does).
_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
SLURM_TIME_FORMATS = "minutes (90), 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS'"


def slurm_minutes(v: int | str) -> int:
    """Return a Slurm time limit (minutes as an int, or a string in Slurm's --time formats) in whole minutes.

    Raises ValueError naming the formats for anything else.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SLURM_TIME_RE.match(v.strip()) if isinstance(v, str) else None
    if m is None:
        raise ValueError(f"expected a time limit as {SLURM_TIME_FORMATS}, got {quote(v)}")
    d, dh, dm, ds, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if d is not None:
        seconds = ((d * 24 + (dh or 0)) * 60 + (dm or 0)) * 60 + (ds or 0)
    elif c is not None:           # H:M:S
        seconds = ((a or 0) * 60 + (b or 0)) * 60 + c
    elif b is not None:           # M:S
        seconds = (a or 0) * 60 + b
    else:                         # M
        seconds = (a or 0) * 60
    return math.ceil(seconds / 60)


def _time_limit(v: Any) -> str | None:
    try:
        minutes = slurm_minutes(v)
    except ValueError as e:
        return str(e)
    return positive_at_most(MAX_TIME_MIN)(minutes)


@dataclass(frozen=True)
class PhaseSpec:
    nodes: int = check(positive_at_most(MAX_NODES), 1)
    ranks_per_node: int = check(positive_at_most(MAX_RANKS_PER_NODE), 1)
    partition: str | None = check(identifier, None)
    gpus_per_node: int = check(in_range(0, MAX_GPUS_PER_NODE), 0)
    cpus_per_rank: int = check(positive_at_most(MAX_RANKS_PER_NODE), 1)
    # numba threads of each rank's gradient kernels (NUMBA_NUM_THREADS); None: cpus_per_rank.
    threads_per_rank: int | None = check(positive_at_most(MAX_RANKS_PER_NODE), None)
    device: Literal["cpu", "gpu", "auto"] = "cpu"
    if TYPE_CHECKING:
        time_min: int | None = None
    else:
        # The schema reads Slurm's own spellings too ('01:00:00', '1-00:00'); __post_init__
        # turns them into minutes, so everything after the load sees an int.
        time_min: int | str | None = check(_time_limit, None)
    mem_gb: float | None = check(positive_at_most(MAX_MEM_GB), None)

    def __post_init__(self) -> None:
        if self.time_min is not None:
            object.__setattr__(self, "time_min", slurm_minutes(self.time_min))

    def validate(self) -> tuple[str, str] | None:
        if self.nodes * self.ranks_per_node > MAX_RANKS:
            return "ranks_per_node", (f"nodes x ranks_per_node = {self.nodes * self.ranks_per_node} ranks; "
                                      f"at most {MAX_RANKS} are supported")
        return None

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def threads(self) -> int:
        """Return the kernel threads per rank: threads_per_rank, else cpus_per_rank."""
        return self.threads_per_rank or self.cpus_per_rank

    def shape(self) -> str:
        """Return the phase shape as 'NxR@partition' for logs."""
        part = f"@{self.partition}" if self.partition else ""
        gpu = f"+{self.gpus_per_node}gpu" if self.gpus_per_node else ""
        return f"{self.nodes}x{self.ranks_per_node}{part}{gpu}"


@dataclass(frozen=True)
class ActionSpec:
    goto: str | None = None
    # closed_form (kind ar only, checked with the model): solve the fit exactly and end the phase.
    optimizer: Literal["sgd", "lbfgs", "bfgs", "closed_form"] | None = None
    stop: bool = False

    def validate(self) -> tuple[str, str] | None:
        n = (self.goto is not None) + (self.optimizer is not None) + bool(self.stop)
        if n != 1:
            return "goto", ("an action is exactly one of {goto: PHASE}, {optimizer: sgd|lbfgs|bfgs|closed_form}, "
                            "{stop: true}")
        return None

    def describe(self) -> str:
        if self.goto:
            return f"goto {self.goto}"
        if self.optimizer:
            return f"optimizer {self.optimizer}"
        return "stop"


@dataclass(frozen=True)
class RuleSpec:
    _aliases: ClassVar[dict[str, str]] = {"in": "in_phases"}
    when: str
    then: ActionSpec
    in_phases: tuple[str, ...] | str | None = None

    @property
    def phases(self) -> tuple[str, ...] | None:
        if self.in_phases is None:
            return None
        return (self.in_phases,) if isinstance(self.in_phases, str) else self.in_phases


@dataclass(frozen=True)
class FleetSpec:
    start: str
    phases: Mapping[str, PhaseSpec]
    rules: tuple[RuleSpec, ...] = ()
    approval: Literal["auto", "manual"] = "auto"


@dataclass(frozen=True)
class SchedulerSpec:
    backend: Literal["local", "slurm"] = "local"
    mpiexec: str | None = None
    launcher_args: tuple[str, ...] = ()             # extra arguments to mpiexec (local) or srun/mpiexec (slurm)
    account: str | None = check(identifier, None)
    qos: str | None = check(identifier, None)
    extra_sbatch: tuple[str, ...] = ()              # more '#SBATCH --key=value' lines, e.g. --constraint=ib
    # Slurm only: what starts the ranks inside the allocation.
    launcher: Literal["srun", "mpiexec"] = "srun"
    # Slurm sends USR2 to the batch shell this long before the time limit; the ranks checkpoint.
    signal_grace_s: int = check(in_range(10, 65535), 120)
    # Resubmissions after a stop by a signal: near the time limit, and otherwise (preemption).
    max_timeouts: int = check(non_negative, 3)
    max_preemptions: int = check(non_negative, 10)
    requeue: bool = False                           # after a stop: `scontrol requeue` instead of a new job
    # Local backend: allow a phase more ranks than this machine has cores (FLEETMPI_OVERSUBSCRIBE wins).
    oversubscribe: bool = False
    submit_attempts: int = check(positive, 6)       # sbatch tries on transient errors
    submit_backoff_s: float = check(non_negative, 2.0)  # first retry delay, doubled per try (at most 60 s)

    def validate(self) -> tuple[str, str] | None:
        for i, opt in enumerate(self.extra_sbatch):
            err = sbatch_extra_option(opt)
            if err:
                return f"extra_sbatch[{i}]", err
        return None


@dataclass(frozen=True)
class RetrySpec:
    max_attempts: int = check(positive, 3)
    backoff_s: float = check(non_negative, 30.0)


@dataclass(frozen=True)
class NotifySpec:
    command: str | None = None
    webhook: str | None = None
    email: str | None = None
    # approval: a rescale waits for `fleetmpi approve` (fleet.approval: manual)
    on: tuple[Literal["terminal", "rescale", "approval"], ...] = ("terminal", "approval")


def machine_cores() -> int:
    """Return the number of cores this process may run on (its CPU affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_local_fit(spec: Spec, cores: int | None = None, source: str = "spec",
                    environ: Mapping[str, str] | None = None) -> None:
    """Refuse a local-backend spec with a phase of more ranks than ``cores``, unless oversubscription is allowed.

    Precedence: FLEETMPI_OVERSUBSCRIBE=1 (allow) or =0 (refuse) > scheduler.oversubscribe > refuse.
    The local launcher calls this before it starts a job; every phase is checked, not only the first.
    """
    if spec.scheduler.backend != "local":
        return
    env = os.environ if environ is None else environ
    flag = env.get("FLEETMPI_OVERSUBSCRIBE", "").strip()
    if flag not in ("", "0", "1"):
        raise BadInput(f"FLEETMPI_OVERSUBSCRIBE={quote(flag, 40)}: expected 1 (allow more ranks than cores) or 0")
    allowed = flag == "1" if flag else spec.scheduler.oversubscribe
    if allowed:
        return
    cores = machine_cores() if cores is None else cores
    for name, ph in spec.fleet.phases.items():
        if ph.ranks > cores:
            raise BadInput(f"{source}: fleet.phases.{name}: {ph.ranks} ranks ({ph.nodes} x {ph.ranks_per_node}) "
                           f"but this machine has {cores} cores; lower ranks_per_node, or allow it with "
                           "scheduler.oversubscribe: true or FLEETMPI_OVERSUBSCRIBE=1")
