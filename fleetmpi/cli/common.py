"""What several subcommands share: the ``--set`` option and what a job argument names."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetmpi.jobs.rows import JobRow

JOB_HELP = "job dir, or a ledger job id or name"


def add_set(p: argparse.ArgumentParser, example: str = "optimizer.lr=0.05") -> None:
    """Add the repeatable ``--set KEY.PATH=VALUE`` spec override to ``p`` (dest ``overrides``)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help=f"override a spec value, e.g. --set {example} (repeatable)")


@dataclass(frozen=True)
class JobRef:
    """What a job argument names: a job dir, and the ledger's row for it when there is one."""

    given: str
    job_dir: Path            # the folder given, or the ledger job's dir; else ``given`` as a path
    row: JobRow | None       # the ledger job: named by id or name, or whose job dir was given
    is_dir: bool             # the argument is a folder (so it is used as a job dir)
    why_no_row: str          # why ``row`` is None, for commands that need a ledger job

    def ledger_row(self) -> JobRow:
        """Return the ledger job; BadInput saying why there is none."""
        from fleetmpi.errors import BadInput
        if self.row is None:
            raise BadInput(self.why_no_row)
        return self.row


def resolve_job(given: str) -> JobRef:
    """Decide whether ``given`` is a job dir (an existing folder) or a ledger job id or name.

    A folder wins over a job of the same name; a name the ledger does not know is kept as a
    path, so a command that reads a job dir says what is wrong with it as one.
    """
    from fleetmpi.jobs.ledger import JobNotFound, Ledger
    path = Path(given)
    ledger = Ledger.existing()
    if ledger is None:
        why = (f"no job {given!r}: the ledger does not exist yet (`fleetmpi run`, `submit` or `queue` "
               "makes it; a job dir works without it)")
        return JobRef(given, path, None, path.is_dir(), why)
    try:
        if path.is_dir():
            here = path.resolve()
            # The newest: `fleetmpi run JOB_DIR` again adds a row for the same dir.
            row = next((r for r in reversed(ledger.jobs()) if Path(r.job_dir).resolve() == here), None)
            why = f"{given}: no job in {ledger.path} has this job dir (`fleetmpi status` lists the ledger's jobs)"
            return JobRef(given, path, row, True, why)
        try:
            row = ledger.find(given)
        except JobNotFound as e:
            return JobRef(given, path, None, False, str(e))
        return JobRef(given, Path(row.job_dir), row, False, "")
    finally:
        ledger.close()
