"""A pre-started phase: its ranks start up while the phase before them still runs, then wait.

The local launcher (:mod:`fleetmpi.launch.local`) may start the next phase's mpiexec before
the running phase has ended (``FLEETMPI_STANDBY=TOKEN:PHASE`` in the ranks' environment).
Those ranks import, initialise MPI, open the data and load the model's kernels, and then
wait for the launcher's word in ``JOB_DIR/standby.json`` (written atomically, after the old
phase's mpiexec ended and its ``phase_exit`` was recorded): ``go`` true and they read the
newest checkpoint and train; false, or a signal, and they exit 0 having written nothing.
Until that word a standby rank writes nothing to the job dir, so the old phase is its only
writer, and it never reads a checkpoint the old phase may still be writing.

Waiting costs no core: rank 0 polls the file every ``POLL_S``; the other ranks wait for its
broadcast in a non-blocking test-and-sleep loop (a blocking MPI_Bcast spins a core).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["POLL_S", "STANDBY_ENV", "Cancelled", "Standby", "await_go", "from_env", "handover_path",
           "write_handover"]

STANDBY_ENV = "FLEETMPI_STANDBY"
POLL_S = 0.01   # rank 0's poll of the handover file: the most it adds to a rescale


class Cancelled(Exception):
    """The launcher (or a signal) called the pre-started phase off: exit 0, nothing written."""


@dataclass(frozen=True)
class Standby:
    """This process is a rank of a pre-started phase ``phase``; the launcher's word carries ``token``."""

    token: str
    phase: str


def from_env() -> Standby | None:
    """Return the standby this rank was started as ($FLEETMPI_STANDBY), or None for an ordinary phase."""
    token, sep, phase = os.environ.get(STANDBY_ENV, "").partition(":")
    return Standby(token, phase) if sep and token and phase else None


def handover_path(root: Path) -> Path:
    return Path(root) / "standby.json"


def write_handover(root: Path, token: str, go: bool, reason: str) -> None:
    """Give the pre-started phase ``token`` its word (launcher side; atomic: never seen half-written)."""
    from fleetmpi.jobdir import atomic_write_bytes
    rec = {"token": token, "go": go, "reason": reason, "t": time.time()}
    atomic_write_bytes(handover_path(root), (json.dumps(rec, sort_keys=True) + "\n").encode())


def _read_word(root: Path, token: str) -> bool | None:
    """Return the launcher's word for ``token`` (True go, False off), or None while there is none."""
    try:
        rec = json.loads(handover_path(root).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("token") != token:
        return None   # a word for an earlier standby of this job dir
    return bool(rec.get("go"))


def await_go(comm: Any, root: Path, standby: Standby, stopped: Callable[[], bool],
             read_state: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Wait for the launcher's word (collective); return the job's state after a go, raise Cancelled otherwise.

    ``stopped``: whether this rank got a stop signal (then the phase is off: the launcher
    that sent it will not say go). Only rank 0 reads the file and the state.
    """
    word = np.zeros(1, dtype=np.int64)
    if comm.Get_rank() == 0:
        while True:
            go = False if stopped() else _read_word(root, standby.token)
            if go is not None:
                break
            time.sleep(POLL_S)
        word[0] = 1 if go else 0
    req = comm.Ibcast(word, root=0)
    while not req.Test():
        time.sleep(POLL_S / 2)
    if not word[0]:
        raise Cancelled(standby.phase)
    return comm.bcast(read_state() if comm.Get_rank() == 0 else None, root=0)
