#!/usr/bin/env bash
# `make demo`: run the quickstart through its rescales to the goal, then predict with the model.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
JOB=runs/demo-$(date +%Y%m%d-%H%M%S)
"$BIN/fleetmpi" run examples/quickstart.yaml --job-dir "$JOB"
echo
echo "== events"
"$BIN/fleetmpi" events "$JOB" | grep -E "rule_fired|rescale|goal" || true
echo
echo "== predict on the validation set"
"$BIN/fleetmpi" predict "$JOB/model.h5" examples/data/valid.h5 --out "$JOB/predictions.h5"
"$BIN/python" - "$JOB" <<'PY'
import sys, h5py, numpy as np
job = sys.argv[1]
with h5py.File(f"{job}/predictions.h5") as p, h5py.File("examples/data/valid.h5") as v:
    acc = float(np.mean(p["arrays/pred"][...] == v["y"][...]))
print(f"validation accuracy of {job}/model.h5: {acc:.3f}")
PY
