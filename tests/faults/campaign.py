"""The fault campaign as a test tier: trials per fault, failures, hangs, bytes lost.

Every test here injects one kind of fault into a real run (kill -9 of a rank or of the
driver, a signal, a corrupt or truncated file, a full disk, a hostile spec or CLI call)
and records how each trial ended through the ``campaign`` fixture (tests/conftest.py). `make test` runs a few
trials of each (enough to reproduce every bug the campaign found); `make faults`
(FLEETMPI_FAULTS=full) runs the full counts and writes the table to
bench/results/faults.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FULL = os.environ.get("FLEETMPI_FAULTS") == "full"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.json"


def trials(ci: int, full: int) -> int:
    """Return how many trials of one fault to run: ``ci`` in `make test`, ``full`` in `make faults`."""
    return full if FULL else ci


@dataclass
class Row:
    """How the trials of one fault ended."""

    fault: str
    trials: int = 0
    failures: int = 0      # the property under test did not hold
    hangs: int = 0         # the run did not end within its deadline
    bytes_lost: int = 0    # bytes of earlier, durable output that were damaged or removed


class Campaign:
    """Collect one Row per fault over the session."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def record(self, fault: str, ok: bool, hang: bool = False, bytes_lost: int = 0) -> None:
        """Record one trial of ``fault``: whether it held, whether it hung, what earlier bytes it damaged."""
        row = self.rows.setdefault(fault, Row(fault))
        row.trials += 1
        row.failures += 0 if ok else 1
        row.hangs += 1 if hang else 0
        row.bytes_lost += bytes_lost


CAMPAIGN = Campaign()


def report() -> None:
    """Print the table of the session's trials; under make faults also save it."""
    rows = [asdict(r) for r in sorted(CAMPAIGN.rows.values(), key=lambda r: r.fault)]
    if not rows:
        return
    lines = [f"{'fault':<48} {'trials':>6} {'failures':>8} {'hangs':>5} {'bytes lost':>10}"]
    lines += [f"{r['fault']:<48} {r['trials']:>6} {r['failures']:>8} {r['hangs']:>5} {r['bytes_lost']:>10}" for r in rows]
    print("\n" + "\n".join(lines))
    if FULL:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"mode": "full", "rows": rows}, indent=1) + "\n")
        os.replace(tmp, RESULTS)
