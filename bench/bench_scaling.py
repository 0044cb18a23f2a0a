"""Strong and weak scaling efficiency of `fleetmpi run` (dense sync) over 1..N ranks on one host.

Data: ``fleetmpi make-data`` synthetic sets of 200000 rows x 128 features (multiclass with
10 classes for softmax; binary for logistic), written once per run. Each point is the real
CLI under mpiexec for STEPS steps without evaluation until the end; samples/s is counted
from metrics.jsonl between the end of the first step and the end of the last (HDF5 reads,
kernel, sync, optimizer, rank-0 logging). Median of REPEAT runs.

strong: global batch fixed at BATCH;      efficiency = sps(P) / (P * sps(1))
weak:   global batch BATCH * P (fixed per rank);  efficiency = sps(P, BATCH * P) / (P * sps(1))
threads: one rank with 2 numba kernel threads (the phase's threads_per_rank), global batch
         BATCH, against the strong 2-rank row (vs_2x1: its samples/s over theirs); the same
         cores, used by threads instead of ranks. Its model must be bitwise the 1-rank,
         1-thread model (same_bits_1x1: the kernels' fixed row chunks), and with sync exact a
         short run of 1 rank x 2 threads must give the bits of 2 ranks x 1 thread
         (exact_1x2_eq_2x1, EXACT_STEPS steps).

``--max-ranks N`` goes to N ranks (powers of two and N; default min(cpu count, 16), at least
2). With more ranks than free cores the ranks share cores and efficiency says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import fleetrun
from common import save, table

N_ROWS, D, CLASSES = 200_000, 128, 10
BATCH = 4096
STEPS = 150
REPEAT = 3
THREADS = 2
EXACT_STEPS = 10
MODELS = {"softmax": ("multiclass", {"kind": "softmax", "l2": 1e-5}),
          "logistic": ("binary", {"kind": "logistic", "l2": 1e-5})}


def rank_counts(max_ranks: int) -> list[int]:
    """Return 1, 2, 4, ... up to max_ranks, and max_ranks itself."""
    counts, p = [], 1
    while p < max_ranks:
        counts.append(p)
        p *= 2
    return [*counts, max_ranks]


def make_data(task: str, out: Path) -> None:
    extra = ["--classes", str(CLASSES)] if task == "multiclass" else []
    cmd = [sys.executable, "-m", "fleetmpi.cli", "make-data", "--task", task, "--n", str(N_ROWS), "--d", str(D),
           *extra, "--valid-fraction", "0.01", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=fleetrun.ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def _spec(model: dict[str, Any], data: Path, ranks: int, batch: int, tag: str, threads: int = 1,
          steps: int = STEPS, sync: str = "dense") -> dict[str, Any]:
    opt = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "batch": batch}
    return fleetrun.spec(f"scaling-{tag}", model, opt, {"max_steps": steps}, ranks, data=data,
                         eval_every_steps=10 ** 9, threads=threads, sync={"kind": sync})


def measure(model: dict[str, Any], data: Path, ranks: int, batch: int, tmp: Path, tag: str,
            threads: int = 1) -> dict[str, Any]:
    """Return median samples/s and comm fraction of REPEAT runs at ``ranks`` x ``threads`` and
    global ``batch``, and the first run's model bytes (``model_bytes``)."""
    spec = _spec(model, data, ranks, batch, tag, threads)
    runs = [fleetrun.run(spec, tmp, f"{tag}-{k}") for k in range(REPEAT)]
    sps = [r.samples_per_s(batch) for r in runs]
    return {"samples_per_s": statistics.median(sps), "spread": (max(sps) - min(sps)) / statistics.median(sps),
            "comm_fraction": statistics.median(r.comm_fraction for r in runs),
            "model_bytes": fleetrun.model_bytes(runs[0].job)}


def exact_same_bits(model: dict[str, Any], data: Path, tmp: Path, tag: str) -> bool:
    """Return whether sync exact gives the same model bits on 1 rank x THREADS threads as on THREADS ranks x 1."""
    a = fleetrun.run(_spec(model, data, 1, BATCH, f"{tag}-1x{THREADS}", THREADS, EXACT_STEPS, "exact"), tmp,
                     f"{tag}-exact-1x{THREADS}")
    b = fleetrun.run(_spec(model, data, THREADS, BATCH, f"{tag}-{THREADS}x1", 1, EXACT_STEPS, "exact"), tmp,
                     f"{tag}-exact-{THREADS}x1")
    return fleetrun.model_bytes(a.job) == fleetrun.model_bytes(b.job)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = max(2, min(os.cpu_count() or 1, 16))
    ap.add_argument("--max-ranks", type=int, default=default,
                    help=f"largest rank count (default here: {default} = min(cpu count, 16), at least 2)")
    args = ap.parse_args()
    if args.max_ranks < 2:
        ap.error(f"--max-ranks must be >= 2, got {args.max_ranks}")
    counts = rank_counts(args.max_ranks)
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, (task, model) in MODELS.items():
            data = tmp / f"data-{task}"
            make_data(task, data)
            one = measure(model, data, 1, BATCH, tmp, f"{name}-1")
            rows.append({"model": name, "mode": "baseline", "ranks": 1, "threads": 1, "batch": BATCH, **one,
                         "efficiency": 1.0})
            strong2 = None
            for p in counts[1:]:
                for mode, batch in (("strong", BATCH), ("weak", BATCH * p)):
                    r = measure(model, data, p, batch, tmp, f"{name}-{mode}-{p}")
                    strong2 = r if (mode, p) == ("strong", THREADS) else strong2
                    rows.append({"model": name, "mode": mode, "ranks": p, "threads": 1, "batch": batch, **r,
                                 "efficiency": r["samples_per_s"] / (p * one["samples_per_s"])})
            r = measure(model, data, 1, BATCH, tmp, f"{name}-threads", THREADS)
            rows.append({"model": name, "mode": "threads", "ranks": 1, "threads": THREADS, "batch": BATCH, **r,
                         "efficiency": r["samples_per_s"] / (THREADS * one["samples_per_s"]),
                         "vs_2x1": r["samples_per_s"] / strong2["samples_per_s"] if strong2 else None,
                         "same_bits_1x1": r["model_bytes"] == one["model_bytes"],
                         "exact_1x2_eq_2x1": exact_same_bits(model, data, tmp, name)})
    for row in rows:
        del row["model_bytes"]
    print(table(f"scaling efficiency, dense sync, synthetic {N_ROWS} x {D} (softmax: {CLASSES} classes), "
                f"{STEPS} steps, median of {REPEAT}, {os.cpu_count()} cores; strong: global batch {BATCH}; "
                f"weak: {BATCH} per rank; threads: 1 rank x {THREADS} kernel threads, global batch {BATCH}; "
                "efficiency = samples/s at P ranks or threads / (P x samples/s at 1 rank); "
                "spread = (max - min) / median", rows,
                [("model", "s"), ("mode", "s"), ("ranks", "d"), ("threads", "d"), ("batch", "d"),
                 ("samples_per_s", ".0f"), ("spread", ".2f"), ("comm_fraction", ".3f"), ("efficiency", ".2f"),
                 ("vs_2x1", ".2f"), ("same_bits_1x1", ""), ("exact_1x2_eq_2x1", "")]))
    save("scaling", rows, rows_data=N_ROWS, d=D, classes=CLASSES, steps=STEPS, repeat=REPEAT,
         cpu_count=os.cpu_count(), max_ranks=args.max_ranks)


if __name__ == "__main__":
    main()
