"""The seam every training technique fits: its state, one collective step, its record.

A technique is what a phase does per step: an SGD step, an L-BFGS iteration, a boosting
round, a closed-form fit. The worker knows only this contract; ``TECHNIQUES`` maps the
names a spec or a rule (``optimizer: NAME``) uses to classes, so a new technique is one
module plus one entry there, and worker.py does not change.

Collective means: every rank of ``run.comm`` calls it, in the same order, with the same
global step; each rank passes its own share of the data. What crosses ranks goes
through ``fleetmpi.sync`` (a gradient technique's ``Sync``) or through MPI calls on
``run.comm`` whose operands every rank sizes alike (a histogram's integer Allreduce).
The run (``fleetmpi.engine.trainer.Trainer``) owns what every technique shares: the
communicator, the spec, the data reader and sample order, and the counters ``step``,
``cursor``, ``samples_seen``, ``stop_signal``. A technique advances ``cursor`` and
``samples_seen`` by what it consumed; the worker advances ``step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer


class StepRecord(NamedTuple):
    """What one step measured, the same on every rank except the timings; rank 0's monitor reads it.

    Immutable, and a NamedTuple rather than a frozen dataclass: one is made per step, and
    a frozen dataclass's __init__ (object.__setattr__ per field) took 1.4 us of a 40 us step
    at batch 256, this 0.4.
    """

    loss: float           # training objective per row at the step (sum over ranks / rows)
    lr: float             # learning rate, or the step length a line search took
    samples: int          # rows the step evaluated over all ranks
    batch_fp: float       # fingerprint of the rows (equal batches, equal fingerprints)
    cursor: int           # position in the sample order when the step began (rows)
    compute_s: float      # seconds of this rank's local work
    comm_s: float         # seconds in collectives
    payload_bytes: int    # bytes this rank handed to MPI (B)
    wire_bytes: float     # bytes this rank put on the wire, estimated (B)
    signal: float         # ranks that had a stop signal when the step began (0: none)
    solved: bool = False  # the technique is done (a closed-form fit solved): the run ends as at its goal


class Technique(ABC):
    """One training technique on one rank of a phase; see the module docstring for "collective"."""

    name: ClassVar[str]   # the key in TECHNIQUES, the spec's optimizer.kind and checkpoints' "optimizer"

    def __init__(self, run: Trainer) -> None:
        """Build on ``run`` (every rank alike; collective only if it says so); fresh state, not yet loaded."""
        self.run = run

    @abstractmethod
    def step(self) -> StepRecord:
        """Take one step of training; collective, every rank at the same ``run.step``.

        Every rank must end with the same model state (a checkpoint checks) and return
        the same loss, samples and signal.
        """

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Return the named arrays a checkpoint holds, merged over ranks, on rank 0 ({} elsewhere).

        Collective. Per-rank parts (residuals, partial statistics) are combined here so
        that ``load_state`` can spread them over any other rank count. Names are stable:
        old checkpoints must load.
        """

    @abstractmethod
    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Take this rank's share of ``arrays`` from a checkpoint written at any rank count.

        Every rank gets the same arrays and must rebuild state so the next step gives
        what the writing phase would have given. Raise CheckpointError / BadInput for
        arrays that do not fit.
        """

    def enter(self) -> None:  # noqa: B027 - optional hook
        """Take over training mid-phase after a rule switched to this technique (every rank alike)."""

    @abstractmethod
    def eval_sums(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Return (summed loss, count of correct predictions) of the current model on X's rows; local."""

    def extra_valid(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Return further validation metrics as sums over X's rows (the run divides by the row count); local.

        Called on every rank at every evaluation, also with 0 rows, and must return the same
        names on every rank (they are summed in one Allreduce); ``{}`` by default.
        """
        return {}

    @abstractmethod
    def model_meta(self) -> dict[str, Any]:
        """Return what rebuilds the model from a file (the checkpoint's and model file's "model")."""

    @abstractmethod
    def write_model(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the final model to ``path`` atomically with the run's ``meta`` (rank 0 only)."""


# name -> "module:Class". A new technique is its module plus one line here. The classes
# are imported on lookup: this module stays free of them, and a GPU-only or optional
# dependency of one technique costs nothing to the others.
TECHNIQUES: dict[str, str] = {
    "sgd": "fleetmpi.engine.gradient:Sgd",
    "adagrad": "fleetmpi.engine.gradient:Adagrad",
    "lbfgs": "fleetmpi.engine.gradient:Lbfgs",
    "gp": "fleetmpi.engine.gp:Gp",
    "boost": "fleetmpi.engine.trees:Boost",
    "bfgs": "fleetmpi.engine.gradient:Bfgs",
    "closed_form": "fleetmpi.engine.closed_form:ClosedForm",
}

# Model kinds that fix their technique (the spec's optimizer section is not theirs).
MODEL_TECHNIQUES: dict[str, str] = {"gp": "gp"}


def technique_class(name: str) -> type[Technique]:
    """Return the class registered as ``name``; ValueError listing the valid names otherwise."""
    import importlib
    where = TECHNIQUES.get(name)
    if where is None:
        raise ValueError(f"unknown training technique {name!r}; valid: {', '.join(sorted(TECHNIQUES))}")
    module, _, attr = where.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Technique) and cls.name == name):
        raise TypeError(f"TECHNIQUES[{name!r}] = {where!r} is not a Technique named {name!r}")
    return cls
