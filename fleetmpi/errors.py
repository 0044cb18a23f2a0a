"""Exit codes and the exception hierarchy of fleetmpi; each exception carries its exit code."""

from __future__ import annotations

import errno
import re
from enum import IntEnum

__all__ = ["BadInput", "CheckpointError", "ExitCode", "FleetError", "TrainingFailed", "one_line", "quote"]


class ExitCode(IntEnum):
    """Exit code of one training phase, of ``fleetmpi run`` / ``submit --wait``, and of a Slurm chain."""

    OK = 0          # the run ended (target met, or no target required); the model is written
    FAILED = 1      # training failed (NaN, a rank crashed or was killed, a kernel error)
    BAD_INPUT = 2   # bad spec, data, checkpoint or arguments: retrying cannot help
    RESCALE = 3     # the phase checkpointed for a rescale; the launcher starts the next phase
    STOPPED = 4     # stopped by a signal after a checkpoint (preemption, time limit); resume from it
    TARGET_MISSED = 5   # goal.require_target: the run ended (model written) without meeting its target; final

    @classmethod
    def of(cls, rc: int) -> ExitCode | None:
        """Return the ExitCode ``rc`` is, or None for any other code (a crash, a signal)."""
        try:
            return cls(rc)
        except ValueError:
            return None

    @property
    def meaning(self) -> str:
        """Return what this code says, in a few words for log lines and JSON."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "run ended, model written",
    ExitCode.FAILED: "training failed",
    ExitCode.BAD_INPUT: "bad input",
    ExitCode.RESCALE: "rescale to the next phase",
    ExitCode.STOPPED: "stopped by a signal after a checkpoint",
    ExitCode.TARGET_MISSED: "target not met (goal.require_target)",
}

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def one_line(text: object) -> str:
    """Return ``str(text)`` with line breaks folded into single spaces."""
    return _LINE_BREAKS.sub(" ", str(text)).strip()


QUOTE_CHARS = 200


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """Return ``repr(value)`` on one line, cut after ``limit`` characters with the full length noted.

    Error messages quote rejected values through this so that a 100 KB value gives a
    readable line; spec loading bounds a value's size, so the repr itself stays cheap.
    """
    text = one_line(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class FleetError(Exception):
    """Base class of every error fleetmpi raises on purpose."""

    exit_code: int = ExitCode.FAILED


class BadInput(FleetError, ValueError):
    """A caller or user mistake (spec, data, checkpoint, CLI); the phase exits with 2.

    The message is kept to one line so the CLI can print it without a traceback.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class CheckpointError(BadInput):
    """A checkpoint or model file is unreadable, corrupt, or belongs to another job."""


class TrainingFailed(FleetError):
    """Training itself failed (NaN loss, kernel error); the phase exits with 1."""

    exit_code = ExitCode.FAILED


class DiskFull(TrainingFailed):
    """A write in the job dir failed for lack of space (or quota); the run ends with one line, exit 1."""


# errno values of a full file system or an exhausted quota; HDF5 reports them inside its message.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "errno = 28", "errno = 122")


def disk_full(e: BaseException, where: object, newest: str | None = None, need: int | None = None) -> str | None:
    """Return the one line for ``e`` if it says the disk under ``where`` is full, else None.

    ``where`` is the path being written (or the job dir); ``newest`` names the newest valid
    checkpoint (what a resume starts from); ``need`` the bytes the write wanted, if known.
    """
    if not isinstance(e, OSError):
        return None
    if e.errno not in _FULL_ERRNOS and not any(w in str(e) for w in _FULL_WORDS):
        return None
    import os
    path = os.path.abspath(str(getattr(e, "filename", None) or where))
    mount = path
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    needed = f"; {need} bytes needed" if need else ""
    resume = (f"the newest valid checkpoint is {newest}" if newest
              else "no valid checkpoint yet (a rerun starts at step 0)")
    return one_line(f"no space left on {mount} writing {path}{needed}; {resume}; free space there, then run "
                    "the same command again to resume")
