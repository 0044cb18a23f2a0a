"""`fleetmpi run` start-up to the first step on 1 rank, for the text bench's model (issue 14).

Data: a seeded synthetic corpus (6 classes of 200 short documents drawn from class-tilted
word lists) hashed by `fleetmpi make-data --from text` into CSR rows of 2^18 columns, so
the run is the text bench's: softmax on CSR data, 2^18 x 6 parameters, sync dense, 1 rank.
Each trial runs `fleetmpi run` to ``max_steps: 1`` and splits command start -> first step
by the driver's launch event and rank 0's start-up marks in phase_start: driver (process,
imports, spec, job dir), mpiexec (-> rank process exists), imports, MPI init, open (data and
trainer), kernels (numba cache load), record (phase_start) and the first step. Also timed:
make-data's whole process (the text issue counts make-data + run). Printed with the 1-min load.
BENCH_TRIALS (default 5) trials; BENCH_PYTHONPATH measures another checkout (a baseline).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from common import save, table

ROOT = Path(__file__).resolve().parent.parent
CODE = os.environ.get("BENCH_PYTHONPATH", str(ROOT))
ENV = {**os.environ, "PYTHONPATH": CODE, "FLEETMPI_PROGRESS": "none", "OMP_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
CLASSES, DOCS, WORDS = 6, 200, 60


def corpus(root: Path, seed: int = 0) -> None:
    """Write root/cN/*.txt: DOCS documents per class, each WORDS words, a third from the class's own list."""
    rnd = random.Random(seed)
    common = [f"w{i}" for i in range(3000)]
    for c in range(CLASSES):
        own = [f"c{c}x{i}" for i in range(200)]
        (root / f"c{c}").mkdir(parents=True)
        for d in range(DOCS):
            words = [rnd.choice(own) if rnd.random() < 0.3 else rnd.choice(common) for _ in range(WORDS)]
            (root / f"c{c}" / f"{d}.txt").write_text(" ".join(words))


def _events(job: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in (job / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        out.setdefault(e["event"], e)
    return out


def trial(tmp: Path, n: int) -> dict[str, float]:
    """Run make-data then `fleetmpi run` to one step; return the seconds of each part."""
    data = tmp / f"data{n}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fleetmpi.cli", "make-data", "--from", "text", str(tmp / "corpus"),
                    "--hash-bits", "18", "--out", str(data)], check=True, capture_output=True, env=ENV, cwd=CODE)
    make_data = time.time() - t0
    spec = {"name": "startup", "seed": 0,
            "data": {"train": str(data / "train.h5"), "valid": str(data / "valid.h5")},
            "model": {"kind": "softmax", "l2": 1e-6},
            "optimizer": {"kind": "sgd", "lr": 8.0, "momentum": 0.9, "batch": 32},
            "sync": {"kind": "dense"}, "goal": {"max_steps": 1},
            "checkpoint": {"every_steps": 10 ** 9, "keep_best": False},
            "monitor": {"log_every_steps": 1, "eval_every_steps": 10 ** 6, "progress": "none"},
            "fleet": {"start": "p", "phases": {"p": {"ranks_per_node": 1}}}}
    (tmp / f"spec{n}.yaml").write_text(yaml.safe_dump(spec))
    job = tmp / f"job{n}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fleetmpi.cli", "run", str(tmp / f"spec{n}.yaml"), "--job-dir", str(job)],
                   check=True, capture_output=True, env=ENV, cwd=CODE)
    end = time.time()
    ev = _events(job)
    launch, start, first = ev["launch"], ev["phase_start"], ev["first_step"]
    m = start["startup"]
    process = m.get("process", m["imported"])
    return {"trial": n, "make_data_s": make_data, "run_s": end - t0, "to_first_step_s": first["t"] - t0,
            "driver_s": launch["t"] - t0, "mpiexec_s": process - launch["t"], "imports_s": m["imported"] - process,
            "mpi_s": m["mpi_ready"] - m["imported"], "open_s": m["trainer_open"] - m["mpi_ready"],
            "kernels_s": m["kernels_ready"] - m["trainer_open"], "record_s": start["t"] - m["kernels_ready"],
            "first_step_s": first["t"] - start["t"], "exit_s": end - first["t"], "load_1min": os.getloadavg()[0]}


COLUMNS = [("trial", "d"), ("make_data_s", ".2f"), ("run_s", ".2f"), ("to_first_step_s", ".2f"), ("driver_s", ".2f"),
           ("mpiexec_s", ".2f"), ("imports_s", ".2f"), ("mpi_s", ".2f"), ("open_s", ".2f"), ("kernels_s", ".2f"),
           ("record_s", ".2f"), ("first_step_s", ".2f"), ("exit_s", ".2f"), ("load_1min", ".1f")]


def main() -> None:
    trials = int(os.environ.get("BENCH_TRIALS", "5"))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus(tmp / "corpus")
        rows = [trial(tmp, n) for n in range(trials)]
    med = {k: statistics.median(r[k] for r in rows) for k, _ in COLUMNS if k != "trial"}
    print(table(f"`fleetmpi run` start-up, 1 rank, softmax on CSR 2^18 x 6 ({CODE})",
                [*rows, {"trial": -1, **med}], COLUMNS))
    print("trial -1: medians")
    print(f"saved {save('startup', rows, code=CODE, medians=med)}")


if __name__ == "__main__":
    main()
