"""Sync bytes to an equal validation loss: dense vs threshold vs exact, 2 ranks, bundled digits.

Every run is the real `fleetmpi run` CLI under mpiexec on examples/data (scikit-learn's
digits: 1438 train / 359 valid rows, 64 features, 10 classes), evaluated after every step
and stopped by ``goal: valid_loss_below`` at the model's target. Bytes are
``sync_bytes_total`` from metrics.jsonl at the goal: per rank, every byte handed to MPI for
the sync (gradient, the extras loss/rows/fingerprint/signal, headers and lengths), counted
the same way for every kind. Dense sends float64 per parameter and exact int64 per
parameter, each with the 4 float64 extras every step. Threshold: every rank's bytes over
the rank count, rounded up: a 1-byte header a rank per step, a gap varint per sent entry
(1 byte on the softmax, mostly 2 on the MLP), a 4- or 8-byte length a rank on steps where
a block passes 126 bytes, and 32 bytes of extras a rank on the steps that carry them
(every step by default; with ``extras_every: N`` the sums over N steps, then the logged
training loss is that window's mean).

Each kind runs at its best point of one grid (the same lr x momentum x batch grid for every
kind; threshold also searches its own sync settings): the point with the fewest bytes
among runs that reached the target. A run stops at the first evaluation below the target;
``within_1pct`` says whether that loss is within 1% of it. A run that overshoots reached a
lower loss with the bytes counted, so keeping it never favours its kind (dense softmax's
best point overshoots the most). ``--tune`` reruns the whole grid (384 runs, about 45
minutes on 2 busy cores), prints it and writes bench/results/compress_tune.json; BEST
below is what it chose. The default run measures only the chosen points (about 30 s).

Before the compact exchange a 40-byte record a step bounded the ratio: dense softmax sends
5232 bytes a step, so at equal step counts threshold was at most ~130x smaller there. Now
a step with nothing to send costs 1 byte a rank and the extras 32/N bytes a step.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import fleetrun
from common import save, table

RANKS = 2
MODELS: dict[str, dict[str, Any]] = {
    "softmax": {"model": {"kind": "softmax", "l2": 1e-4}, "target": 0.20},
    "mlp": {"model": {"kind": "mlp", "hidden": [256], "l2": 1e-4}, "target": 0.10},
}
GRID_LR = (0.1, 0.3, 1.0, 3.0)
GRID_MOMENTUM = (0.0, 0.9)
GRID_BATCH = (32, 128, 512)
# Threshold's own settings, searched at every grid point (tau in units of one rank's gradient sum).
# extras_every: 50 is the default evaluation interval (a rule at an evaluation sees a training
# loss at most 49 steps old); the settings without it send the extras every step.
GRID_THRESHOLD: tuple[dict[str, Any], ...] = (
    {"kind": "threshold", "tau": 1.0}, {"kind": "threshold", "tau": 4.0}, {"kind": "threshold", "tau": 16.0},
    {"kind": "threshold", "tau": 1.0, "adaptive": True, "target_density": 0.003},
    {"kind": "threshold", "tau": 16.0, "extras_every": 50}, {"kind": "threshold", "tau": 64.0, "extras_every": 50},
)
MAX_EPOCHS = 60        # a run that has not reached the target by then does not count
TOLERANCE = 0.01       # "equal loss": stopped with valid loss in [(1 - TOLERANCE) * target, target)

# Chosen by `bench_compress.py --tune` (fewest bytes to the target per model and kind;
# for threshold, the best fixed tau and the best adaptive setting with extras every step,
# and the best of the extras_every settings: tuned with --settings 6 7 for the softmax,
# --settings 6 for the MLP, bench/results/compress_tune_part.json).
BEST: dict[str, dict[str, dict[str, Any]]] = {
    "softmax": {
        "dense": {"lr": 3.0, "momentum": 0.9, "batch": 512, "sync": {"kind": "dense"}},
        "exact": {"lr": 3.0, "momentum": 0.9, "batch": 512, "sync": {"kind": "exact"}},
        "threshold": {"lr": 1.0, "momentum": 0.9, "batch": 512, "sync": {"kind": "threshold", "tau": 16.0}},
        "threshold adaptive": {"lr": 3.0, "momentum": 0.0, "batch": 32, "sync": GRID_THRESHOLD[3]},
        "threshold extras_every": {"lr": 3.0, "momentum": 0.0, "batch": 32, "sync": GRID_THRESHOLD[4]},
    },
    "mlp": {
        "dense": {"lr": 0.3, "momentum": 0.9, "batch": 512, "sync": {"kind": "dense"}},
        "exact": {"lr": 0.3, "momentum": 0.9, "batch": 512, "sync": {"kind": "exact"}},
        "threshold": {"lr": 3.0, "momentum": 0.0, "batch": 128, "sync": {"kind": "threshold", "tau": 16.0}},
        "threshold adaptive": {"lr": 1.0, "momentum": 0.0, "batch": 128, "sync": GRID_THRESHOLD[3]},
        "threshold extras_every": {"lr": 3.0, "momentum": 0.0, "batch": 128, "sync": GRID_THRESHOLD[4]},
    },
}


def sync_label(sync: dict[str, Any]) -> str:
    """Return a short name of a sync setting, e.g. 'threshold tau=16' or 'threshold adaptive d=0.003'."""
    if sync["kind"] != "threshold":
        return sync["kind"]
    every = f" extras_every={sync['extras_every']}" if sync.get("extras_every") else ""
    if sync.get("adaptive"):
        return f"threshold adaptive d={sync['target_density']:g} (tau0={sync['tau']:g}){every}"
    return f"threshold tau={sync['tau']:g}{every}"


def measure(model_name: str, cfg: dict[str, Any], tmp: Path, tag: str) -> dict[str, Any]:
    """Run one configuration to the model's target; return a result row (reached or not)."""
    m = MODELS[model_name]
    target = m["target"]
    opt = {"kind": "sgd", "lr": cfg["lr"], "momentum": cfg["momentum"], "batch": cfg["batch"]}
    spec = fleetrun.spec(f"compress-{model_name}", m["model"], opt,
                         {"valid_loss_below": target, "max_epochs": MAX_EPOCHS}, RANKS, cfg["sync"],
                         eval_every_steps=1)
    row: dict[str, Any] = {"model": model_name, "sync": sync_label(cfg["sync"]), "lr": cfg["lr"],
                           "momentum": cfg["momentum"], "batch": cfg["batch"], "target": target}
    try:
        r = fleetrun.run(spec, tmp, tag)
    except RuntimeError as e:  # diverged (NaN loss) or failed: a grid point that does not count
        return {**row, "reached": False, "within_1pct": False, "error": str(e).splitlines()[0]}
    return {**row, "reached": r.reached, "within_1pct": r.reached and r.valid_loss >= (1 - TOLERANCE) * target,
            "steps": r.step, "epochs": r.epoch, "valid_loss": r.valid_loss, "bytes": r.sync_bytes_total,
            "bytes_per_epoch": r.sync_bytes_total / r.epoch, "train_s": r.train_s}


def tune(tmp: Path, models: list[str], syncs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the lr x momentum x batch grid for ``models`` and ``syncs``; print the best points.

    The whole grid writes compress_tune.json; a part of it compress_tune_part.json.
    """
    rows = []
    for model_name in models:
        for sync, lr, mom, batch in itertools.product(syncs, GRID_LR, GRID_MOMENTUM, GRID_BATCH):
            cfg = {"lr": lr, "momentum": mom, "batch": batch, "sync": sync}
            row = measure(model_name, cfg, tmp, f"tune-{len(rows)}")
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    whole = models == list(MODELS) and len(syncs) == 2 + len(GRID_THRESHOLD)
    save("compress_tune" if whole else "compress_tune_part", rows,
         grid={"lr": GRID_LR, "momentum": GRID_MOMENTUM, "batch": GRID_BATCH, "threshold": GRID_THRESHOLD,
               "max_epochs": MAX_EPOCHS, "tolerance": TOLERANCE})
    for model_name in models:
        for label in sorted({r["sync"] for r in rows}):
            ok = [r for r in rows if r["model"] == model_name and r["reached"] and r["sync"] == label]
            best = min(ok, key=lambda r: r["bytes"]) if ok else None
            print(f"best {model_name} {label}: {best}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true", help="run the whole grid (384 runs, ~45 min) instead of the chosen points")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="--tune only these models")
    ap.add_argument("--settings", nargs="+", type=int, metavar="I",
                    help="--tune only these syncs: 0 dense, 1 exact, 2.. GRID_THRESHOLD[I - 2]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        if args.tune:
            syncs = [{"kind": "dense"}, {"kind": "exact"}, *GRID_THRESHOLD]
            tune(Path(t), args.models, [syncs[i] for i in args.settings] if args.settings else syncs)
            return
        rows = []
        for model_name, kinds in BEST.items():
            base = None
            for kind, cfg in kinds.items():
                row = {"kind": kind, **measure(model_name, cfg, Path(t), f"{model_name}-{kind.replace(' ', '-')}")}
                if kind == "dense":
                    base = row
                if base is not None and row.get("reached") and base.get("reached"):
                    row["ratio_bytes"] = base["bytes"] / row["bytes"]
                    row["ratio_per_epoch"] = base["bytes_per_epoch"] / row["bytes_per_epoch"]
                rows.append(row)
    for model_name, m in MODELS.items():
        arch = "softmax 64-10" if model_name == "softmax" else "MLP 64-256-10"
        print(table(f"\nsync bytes per rank to valid log-loss < {m['target']} (equal loss: stopped at the first "
                    "evaluation below it, after every step), "
                    f"{arch}, bundled digits (1438 train / 359 valid), {RANKS} ranks; "
                    "ratio = dense / this (higher: fewer bytes; goal for threshold >= 100)",
                    [r for r in rows if r["model"] == model_name],
                    [("kind", "s"), ("sync", "s"), ("lr", "g"), ("momentum", "g"), ("batch", "d"), ("steps", "d"),
                     ("epochs", ".2f"), ("valid_loss", ".4f"), ("within_1pct", ""), ("bytes", "d"), ("bytes_per_epoch", ".0f"),
                     ("ratio_bytes", ".1f"), ("ratio_per_epoch", ".1f")]))
    print(f"grid per kind: lr {GRID_LR} x momentum {GRID_MOMENTUM} x batch {GRID_BATCH}, <= {MAX_EPOCHS} epochs; "
          f"threshold also {[sync_label(s) for s in GRID_THRESHOLD]}; rerun with --tune")
    save("compress_bytes", rows, ranks=RANKS, data="examples/data (digits)",
         targets={k: v["target"] for k, v in MODELS.items()},
         grid={"lr": GRID_LR, "momentum": GRID_MOMENTUM, "batch": GRID_BATCH, "threshold": GRID_THRESHOLD})


if __name__ == "__main__":
    main()
