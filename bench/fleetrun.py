"""Run the real `fleetmpi run` CLI on a spec and read back what its job directory recorded.

Shared by bench_compress.py and bench_scaling.py. Not a benchmark itself (bench/run.py
runs only the files it names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "data"
# The environment `make bench` (bench/run.py) runs every benchmark in; a bench run by hand uses it too.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "NUMBA_NUM_THREADS": "1", "FLEETMPI_PROGRESS": "none"}


@dataclass
class JobResult:
    """What one `fleetmpi run` reached, read from its events.jsonl and metrics.jsonl."""

    reason: str             # the goal event's reason: a goal name, or the budget
    step: int
    epoch: float
    valid_loss: float       # at the last evaluation (the one that ended the run)
    sync_bytes_total: int   # payload this rank handed to MPI up to the end, per rank
    train_s: float          # first_step event -> goal event (rank 0 clock)
    wall_s: float           # whole CLI: interpreter, mpiexec, imports, HDF5 reads, training
    first_step: int         # steps done at the first_step event (1 for a fresh job)
    steps_s: float          # metrics record of the first step -> that of the last step (no final eval)
    comm_fraction: float    # sum of comm_s / sum of (compute_s + comm_s) over every logged step
    job: Path               # the job dir (model.h5: model_bytes)

    @property
    def reached(self) -> bool:
        return "budget" not in self.reason

    def train_rate(self, batch: int) -> float:
        """Return samples/s from the first_step event to the goal event (final evaluation included)."""
        return (self.step - self.first_step) * batch / self.train_s

    def samples_per_s(self, batch: int) -> float:
        """Return samples/s of the steps after the first (HDF5 read, kernel, sync, optimizer, logging)."""
        return (self.step - self.first_step) * batch / self.steps_s


def spec(name: str, model: dict[str, Any], optimizer: dict[str, Any], goal: dict[str, Any], ranks: int,
         sync: dict[str, Any] | None = None, data: Path = DIGITS, eval_every_steps: int = 2,
         threads: int = 1) -> dict[str, Any]:
    """Return a one-phase spec dict: no checkpoints before the goal, metrics every step.

    ``threads``: the phase's threads_per_rank (numba kernel threads of each rank).
    """
    phase: dict[str, Any] = {"ranks_per_node": ranks, **({"threads_per_rank": threads} if threads > 1 else {})}
    return {"name": name, "seed": 0,
            "data": {"train": str(data / "train.h5"), "valid": str(data / "valid.h5")},
            "model": model, "optimizer": optimizer, "sync": sync or {"kind": "dense"}, "goal": goal,
            "checkpoint": {"every_steps": 10 ** 9},
            "monitor": {"log_every_steps": 1, "eval_every_steps": eval_every_steps, "progress": "none"},
            "fleet": {"start": "p", "phases": {"p": phase}}}


def model_bytes(job: Path) -> bytes:
    """Return the final model's float64 arrays of a finished job dir, concatenated in name order."""
    # The bench's own process imports fleetmpi only here.
    from fleetmpi.h5store import read_h5_verified
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return b"".join(a.tobytes() for _, a in sorted(arrays.items()) if a.dtype.kind == "f")


def throughput_spec(data: Path, batch: int, epochs: float, device: str = "cpu",
                    model: dict[str, Any] | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Return a 1-rank spec for throughput (logistic unless ``model``): no evaluation or checkpoint before the end.

    ``max_steps``, when given, ends the run there instead of after ``epochs``.
    """
    goal = {"max_steps": max_steps} if max_steps else {"max_epochs": epochs}
    return {"name": "bench", "data": {"train": str(data / "train.h5"), "valid": str(data / "valid.h5")},
            "model": model or {"kind": "logistic", "l2": 1e-5},
            "optimizer": {"kind": "sgd", "lr": 0.05 if model else 0.5, "momentum": 0.9, "batch": batch},
            "goal": goal, "checkpoint": {"every_steps": 10 ** 9},
            "monitor": {"log_every_steps": 20, "eval_every_steps": 10 ** 9, "progress": "none"},
            "fleet": {"start": "one", "phases": {"one": {"ranks_per_node": 1, "device": device}}}}


def run(spec_dict: dict[str, Any], tmp: Path, tag: str) -> JobResult:
    """Run ``fleetmpi run`` on ``spec_dict`` in ``tmp/tag``; raise RuntimeError with both streams on failure."""
    folder = tmp / tag
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    job = folder / "job"
    cmd = [sys.executable, "-m", "fleetmpi.cli", "run", str(path), "--job-dir", str(job)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    ev = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    first = next(e for e in ev if e["event"] == "first_step")
    goal = next(e for e in ev if e["event"] == "goal")
    metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if not m.get("eval")]
    t_step = {m["step"]: m["t"] for m in steps}
    busy = sum(m["compute_s"] + m["comm_s"] for m in steps)
    return JobResult(reason=goal["reason"], step=goal["step"], epoch=goal["epoch"],
                     valid_loss=float(metrics[-1].get("valid_loss", float("nan"))),
                     sync_bytes_total=int(metrics[-1]["sync_bytes_total"]), train_s=goal["t"] - first["t"],
                     wall_s=wall, first_step=first["step"],
                     steps_s=t_step.get(goal["step"], goal["t"]) - t_step.get(first["step"], first["t"]),
                     comm_fraction=sum(m["comm_s"] for m in steps) / busy if busy > 0 else 0.0, job=job)
