"""Exception hierarchy of fleetmpi; each class carries the phase exit code it maps to.

Exit codes (DESIGN.md): 2 bad input (spec, data, checkpoint, CLI), 1 failure in training.
"""

from __future__ import annotations

import re

__all__ = ["BadInput", "CheckpointError", "FleetError", "TrainingFailed"]

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def one_line(text: object) -> str:
    """Return ``str(text)`` with line breaks folded into single spaces."""
    return _LINE_BREAKS.sub(" ", str(text)).strip()


class FleetError(Exception):
    """Base class of every error fleetmpi raises on purpose."""

    exit_code: int = 1


class BadInput(FleetError, ValueError):
    """A caller or user mistake (spec, data, checkpoint, CLI); the phase exits with 2.

    The message is kept to one line so the CLI can print it without a traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class CheckpointError(BadInput):
    """A checkpoint or model file is unreadable, corrupt, or belongs to another job."""


class TrainingFailed(FleetError):
    """Training itself failed (NaN loss, kernel error); the phase exits with 1."""

    exit_code = 1
