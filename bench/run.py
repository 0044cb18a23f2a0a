"""`make bench`: run every benchmark, print its ratio table, write bench/results/*.json and a PNG.

Each benchmark compares against a baseline measured in the same run (same process or the
same mpiexec world). Not part of CI: timings are read by people, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
sys.path.insert(0, str(HERE))
from fleetrun import ENV  # one place for the benchmarks' threads and PYTHONPATH

BENCHES: list[tuple[str, list[str]]] = [
    ("kernels", [PY, str(HERE / "bench_kernels.py")]),
    ("sync, 2 ranks", [MPIEXEC, "-n", "2", PY, str(HERE / "bench_sync.py")]),
    ("rescale latency", [PY, str(HERE / "bench_rescale.py")]),
    ("throughput", [PY, str(HERE / "bench_throughput.py")]),
]
OPTIONAL = [  # benchmarks of layers that ship separately; run when present
    ("compressed sync", [PY, str(HERE / "bench_compress.py")]),
    ("time to loss vs peers", [PY, str(HERE / "bench_peers.py")]),
    ("scaling", [PY, str(HERE / "bench_scaling.py")]),
    ("ledger", [PY, str(HERE / "bench_ledger.py")]),
    ("trees vs LightGBM / XGBoost", [PY, str(HERE / "bench_trees.py")]),
    ("gp vs scikit-learn GP", [PY, str(HERE / "bench_gp.py")]),
    ("bfgs vs scipy BFGS and lbfgs", [PY, str(HERE / "bench_bfgs.py")]),
    ("gpu kernels and phase", [PY, str(HERE / "bench_gpu.py")]),   # prints "no GPU: skipped" without one
    ("gpu tree histograms", [PY, str(HERE / "bench_gpu_trees.py")]),   # likewise
    ("text: man pages vs scikit-learn", [PY, str(HERE / "bench_text.py")]),   # CSR training once sync sparse exists
    ("start-up to first step, 1 rank", [PY, str(HERE / "bench_startup.py")]),
]


def plot(out: Path, results: Path = HERE / "results") -> None:
    """Draw the results that exist in ``results`` into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    fig, axes = plt.subplots(4, 2, figsize=(12, 16))
    if "kernels" in res:
        rows = res["kernels"]["rows"]
        ax = axes[0, 0]
        names = [f"{r['kernel']}\n{r['n']}" for r in rows]
        xs = range(len(rows))
        bars = (([r["fused_GBps"] for r in rows], "fused numba"), ([r["numpy_GBps"] for r in rows], "numpy two-pass"),
                ([max(r["read32_GBps"], r["read64_GBps"]) for r in rows], "read loop"))
        for i, (vals, label) in enumerate(bars):
            ax.bar([x + 0.27 * (i - 1) for x in xs], vals, width=0.27, label=label)
        ax.set_xticks(list(xs), names, fontsize=7, rotation=90)
        ax.set_ylabel("GB/s of X")
        ax.set_title("gradient kernels, one thread (bench_kernels)")
        ax.legend(fontsize=8)
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
        # Local rows (limit 0.8 s) and the minicluster's Slurm rows (limit 1.5 s), rule -> first step.
        rows = res["rescale_latency"]["rows"]
        ax = axes[1, 0]
        labels = [f"{r['workload']} {r.get('prestart') or ''} {r['rescale']} #{r['trial']}" for r in rows]
        slurm = ["slurm" in r["workload"] for r in rows]
        ax.barh(labels, [r["latency_s"] for r in rows], color=["tab:purple" if s else "tab:blue" for s in slurm])
        ax.axvline(0.8, ls="--", c="tab:blue", label="local limit 0.8 s")
        ax.axvline(1.5, ls="--", c="tab:purple", label="Slurm limit 1.5 s")
        ax.tick_params(axis="y", labelsize=6)
        ax.set_xlabel("seconds, rule fired -> first step of the next phase")
        ax.set_title("rescale latency")
        ax.legend(fontsize=8)
    if "throughput_1rank" in res:
        rows = res["throughput_1rank"]["rows"]
        ax = axes[1, 1]
        ax.barh([r["system"] for r in rows], [r["samples_per_s"] for r in rows])
        ax.set_xlabel("samples/s")
        ax.set_title("1-rank throughput, logistic 200k x 64")
    plot_training(res, axes[2, 0], axes[2, 1], axes[3, 0])
    axes[3, 1].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def plot_training(res: dict, bytes_ax: Any, time_ax: Any, scale_ax: Any) -> None:
    """Draw sync bytes to equal loss, time to loss against peers, and scaling efficiency."""
    if "compress_bytes" in res:
        rows = [r for r in res["compress_bytes"]["rows"] if r.get("reached")]
        labels = [f"{r['model']} {r['kind']}" for r in rows]
        bars = bytes_ax.barh(labels, [r["bytes"] for r in rows])
        for bar, r in zip(bars, rows):
            bytes_ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.get('ratio_bytes', 0):.0f}x",
                          va="center", fontsize=8)
        bytes_ax.set_xscale("log")
        bytes_ax.set_xlabel("sync bytes per rank to the target valid loss (log)")
        bytes_ax.set_title("bytes at equal loss, digits, 2 ranks (label: dense / this)")
    if "peers_time_to_loss" in res:
        rows = res["peers_time_to_loss"]["rows"]
        labels = [f"{r['case'].split(',')[0]}: {' '.join(r['system'].split()[:2])}" for r in rows]
        time_ax.barh(labels, [r["wall_s"] or 0 for r in rows], color="tab:orange", alpha=0.4,
                     label="whole command")
        time_ax.barh(labels, [r["train_s"] for r in rows], color="tab:blue", label="first step -> target")
        time_ax.set_xscale("log")
        time_ax.tick_params(axis="y", labelsize=7)
        time_ax.set_xlabel("seconds (log)")
        time_ax.set_title("time to target valid loss, digits")
        time_ax.legend(fontsize=8)
    if "scaling" in res:
        rows = res["scaling"]["rows"]
        for model in dict.fromkeys(r["model"] for r in rows):
            base = [r for r in rows if r["model"] == model and r["mode"] == "baseline"]
            for mode, style in (("strong", "o-"), ("weak", "s--"), ("threads", "^:")):
                pts = base + [r for r in rows if r["model"] == model and r["mode"] == mode]
                label = f"{model} {mode}" if mode != "threads" else f"{model} 1 rank, N threads"
                scale_ax.plot([r["ranks"] * r.get("threads", 1) for r in pts], [r["efficiency"] for r in pts], style,
                              label=label)
        scale_ax.axhline(1.0, ls=":", c="gray")
        scale_ax.set_xscale("log", base=2)
        scale_ax.set_xticks(sorted({r["ranks"] for r in rows}), [str(p) for p in sorted({r["ranks"] for r in rows})])
        scale_ax.set_xlabel("ranks (threads: of one rank)")
        scale_ax.set_ylabel("efficiency")
        scale_ax.set_ylim(0, 1.2)
        scale_ax.set_title("scaling, synthetic 200k x 128, dense sync")
        scale_ax.legend(fontsize=8)


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
