"""How a rank ends: a failure every rank saw, one only some ranks saw, and the fast exit.

An error that arises on every rank alike (collective set-up, an allreduced loss) ends the
phase with its exit code and one line from rank 0. One that only some ranks raised (a bad
batch, a write this rank alone made) cannot be told to the others, which would wait in the
next collective: the world is aborted, with the line naming rank/size@host. Either way the
line also goes to events.jsonl as an ``error`` event (the launcher says it again if mpiexec
lost the rank's output).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from typing import Any

from fleetmpi.jobdir import JobDir


def fail(comm: Any, jd: JobDir | None, code: int, msg: str, debug: bool) -> int:
    """End a phase on an error every rank raised alike, or abort the world if only some did."""
    if debug:
        traceback.print_exc()
    # Errors from collective setup or from allreduced values arise on every rank alike;
    # a rank-local one (a bad batch on one rank) must not leave the others waiting.
    if all_failed(comm):
        if comm.Get_rank() == 0:
            print(msg, file=sys.stderr, flush=True)
            record_error(jd, msg)
        return code
    return abort_world(comm, jd, code, msg)


def abort_world(comm: Any, jd: JobDir | None, code: int, msg: str) -> int:
    """Say ``msg`` ("fleetmpi: ...") as this rank's line (rank/size@host), record it, and abort every rank."""
    rank, size, host = comm.Get_rank(), comm.Get_size(), socket.gethostname()
    line = msg.replace("\n", " ").replace("fleetmpi: ", f"fleetmpi: rank {rank}/{size}@{host}: ", 1)
    print(line, file=sys.stderr, flush=True)
    record_error(jd, line)
    comm.Abort(code)
    return code


def all_failed(comm: Any) -> bool:
    """Return whether every rank reached this point within a short wait (non-blocking poll)."""
    req = comm.Ibarrier()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if req.Test():
            return True
        time.sleep(0.005)
    return False


def record_error(jd: JobDir | None, msg: str) -> None:
    if jd is None:
        return
    try:
        jd.event("error", message=msg)
    except OSError:
        pass


def exit_now(code: int) -> None:
    """End this rank with ``code`` right after MPI_Finalize, skipping the interpreter's teardown.

    With numba and LLVM loaded, Python's own shutdown takes 0.3-2 s per rank and mpiexec
    waits for the slowest: on a rescale that is most of the gap between the phases. By now
    every durable write (checkpoint, model, events, state) is fsynced and closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    # libc's exit, not os._exit: it runs the C atexit handlers (MPICH's among them; about
    # 10 ms more). Without them hydra took 1 in 4 of such exits for a crash and SIGKILLed
    # the ranks still exiting (mpiexec rc 9 after a clean phase end): with 3 ranks leaving
    # 0.3 s apart, 11 of 36 runs were killed with os._exit, none of 10 with libc's exit.
    try:
        import ctypes
        ctypes.CDLL(None).exit(code)
    except (OSError, AttributeError):
        pass
    os._exit(code)
