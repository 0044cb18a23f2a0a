"""`make bench`: run every benchmark, print its ratio table, write bench/results/*.json and a PNG.

Each benchmark compares against a baseline measured in the same run (same process or the
same mpiexec world). Not part of CI: timings are read by people, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "NUMBA_NUM_THREADS": "1", "FLEETMPI_PROGRESS": "none"}

BENCHES: list[tuple[str, list[str]]] = [
    ("kernels", [PY, str(HERE / "bench_kernels.py")]),
    ("sync, 2 ranks", [MPIEXEC, "-n", "2", PY, str(HERE / "bench_sync.py")]),
    ("rescale latency", [PY, str(HERE / "bench_rescale.py")]),
    ("throughput", [PY, str(HERE / "bench_throughput.py")]),
]
OPTIONAL = [  # benchmarks of layers that ship separately; run when present
    ("compressed sync", [PY, str(HERE / "bench_compress.py")]),
    ("ledger", [PY, str(HERE / "bench_ledger.py")]),
]


def plot(out: Path) -> None:
    """Draw the results that exist into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {p.stem: json.loads(p.read_text()) for p in (HERE / "results").glob("*.json")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    if "kernels" in res:
        rows = res["kernels"]["rows"]
        ax = axes[0, 0]
        names = [r["kernel"] for r in rows]
        xs = range(len(rows))
        for i, (key, label) in enumerate((("fused_GBps", "fused numba"), ("numpy_GBps", "numpy two-pass"),
                                          ("numpy_f64_GBps", "numpy float64"))):
            ax.bar([x + 0.27 * (i - 1) for x in xs], [r[key] or 0 for r in rows], width=0.27, label=label)
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("GB/s of X")
        ax.set_title("gradient kernels")
        ax.legend()
    sync = [v for k, v in res.items() if k.startswith("sync_dense")]
    if sync:
        ax = axes[0, 1]
        for doc in sync:
            rows = doc["rows"]
            ax.semilogx([r["size_KiB"] for r in rows], [r["ratio"] for r in rows], "o-", label=f"{doc['ranks']} ranks")
        ax.axhline(1.05, ls="--", c="gray", label="goal 1.05")
        ax.set_xlabel("buffer KiB")
        ax.set_ylabel("dense sync / raw Allreduce")
        ax.set_title("sync overhead")
        ax.legend()
    if "rescale_latency" in res:
        rows = res["rescale_latency"]["rows"]
        ax = axes[1, 0]
        labels = [f"{r['rescale']} #{r['trial']}" for r in rows]
        bottom = [0.0] * len(rows)
        for key in ("exit_s", "startup_s", "first_step_s"):
            vals = [r[key] for r in rows]
            ax.barh(labels, vals, left=bottom, label=key)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axvline(3.0, ls="--", c="gray")
        ax.set_xlabel("seconds, rule fired -> first step")
        ax.set_title("local rescale latency")
        ax.legend()
    if "throughput_1rank" in res:
        rows = res["throughput_1rank"]["rows"]
        ax = axes[1, 1]
        ax.barh([r["system"] for r in rows], [r["samples_per_s"] for r in rows])
        ax.set_xlabel("samples/s")
        ax.set_title("1-rank throughput, logistic 200k x 64")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> int:
    failed = []
    t0 = time.time()
    for name, cmd in BENCHES + [b for b in OPTIONAL if Path(b[1][-1]).exists()]:
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, env=ENV, cwd=ROOT).returncode
        if rc:
            failed.append(f"{name} (exit {rc})")
    png = HERE / "results" / "bench.png"
    plot(png)
    print(f"\nresults: {HERE / 'results'}/*.json, plot: {png}; {time.time() - t0:.0f} s")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
