"""Local rescale latency: rule fired -> first step of the next phase, from a real run's events.

Runs examples/quickstart.yaml (2 -> 3 -> 1 ranks) with the local backend and splits each
rescale into: checkpoint + exit, mpiexec + interpreter + imports up to phase_start, and
phase_start to the first finished step (numba kernels load from the on-disk cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import save, table

ROOT = Path(__file__).resolve().parent.parent


def measure(job: Path) -> list[dict]:
    ev = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    rows = []
    for i, e in enumerate(ev):
        if e["event"] != "rule_fired" or not e["action"].startswith("goto"):
            continue
        after = ev[i + 1:]
        exit_ = next(x for x in after if x["event"] == "phase_exit")
        start = next(x for x in after if x["event"] == "phase_start")
        first = next(x for x in after if x["event"] == "first_step" and x["t"] >= start["t"])
        rows.append({"rescale": f"{e['phase']} -> {e['action'][5:]}", "to_ranks": start["ranks"],
                     "latency_s": first["t"] - e["t"], "exit_s": exit_["t"] - e["t"],
                     "startup_s": start["t"] - exit_["t"], "first_step_s": first["t"] - start["t"]})
    return rows


def main() -> None:
    rows = []
    for trial in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job"
            subprocess.run([sys.executable, "-m", "fleetmpi.cli", "run", str(ROOT / "examples/quickstart.yaml"),
                            "--job-dir", str(job)], check=True, capture_output=True,
                           env={**os.environ, "FLEETMPI_PROGRESS": "none"})
            rows += [{"trial": trial, **r} for r in measure(job)]
    print(table("local rescale latency, rule fired -> first step of the next phase (goal <= 3 s)", rows,
                [("trial", "d"), ("rescale", "s"), ("to_ranks", "d"), ("latency_s", ".2f"), ("exit_s", ".2f"),
                 ("startup_s", ".2f"), ("first_step_s", ".2f")]))
    save("rescale_latency", rows)


if __name__ == "__main__":
    main()
