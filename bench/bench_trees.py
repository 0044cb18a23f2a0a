"""Histogram GBDT: fleetmpi's tree learner vs LightGBM and XGBoost (tree_method=hist), one thread each.

Same rounds, depth, learning rate, bins, l2 and min_child_weight for all three, on
scikit-learn's bundled breast-cancer (binary) and digits (10 classes, one tree per class
per round) and a synthetic 200k x 50 classification set; 80/20 seeded train/valid split.
Columns: valid log-loss; seconds per round (training only: binning / Dataset / DMatrix
construction happen before the clock starts) and its ratio to LightGBM; fleetmpi at 2
ranks under mpiexec (rows split in contiguous shares) and its speed-up over 1 rank; the
int64 histogram bytes each rank puts into the Allreduce per round. Each figure is the
best of REPEAT runs. Targets from issue 13: log-loss within 2% of the better peer,
1-rank time per round at most 1.5x LightGBM's, 2 ranks at least 1.6x faster than 1 on
the 200k set. Nothing is asserted.

``python bench/bench_trees.py`` runs everything; ``--ours NAME`` is the per-rank worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import save, table

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")
REPEAT = 3
PARAMS = {"depth": 6, "learning_rate": 0.1, "bins": 255, "l2": 1.0, "min_child_weight": 1.0}
DATASETS = {"breast-cancer": 100, "digits": 100, "synthetic 200k x 50": 30}    # name -> rounds


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Return (X train, y train, X valid, y valid, classes) as float32 / float32."""
    from sklearn import datasets

    if name == "breast-cancer":
        X, y = datasets.load_breast_cancer(return_X_y=True)
    elif name == "digits":
        X, y = datasets.load_digits(return_X_y=True)
    else:
        X, y = datasets.make_classification(n_samples=250_000, n_features=50, n_informative=30, n_redundant=10,
                                            flip_y=0.02, random_state=0)
    perm = np.random.default_rng(0).permutation(X.shape[0])
    cut = 200_000 if X.shape[0] == 250_000 else int(0.8 * X.shape[0])
    X = X[perm].astype(np.float32)
    y = y[perm].astype(np.float32)
    return X[:cut], y[:cut], X[cut:], y[cut:], int(y.max()) + 1


def log_loss(prob: np.ndarray, y: np.ndarray) -> float:
    """Return the mean log-loss of probabilities (n,) for binary or (n, k) for multiclass."""
    eps = 1e-15
    if prob.ndim == 1:
        p = np.clip(prob, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(np.clip(prob[np.arange(y.size), y.astype(np.int64)], eps, 1))))


# --------------------------------------------------------------------------- peers


def lightgbm_run(name: str, rounds: int) -> dict[str, Any]:
    import lightgbm as lgb

    X, y, Xv, yv, k = load(name)
    params = {"objective": "binary" if k == 2 else "multiclass", "num_class": 1 if k == 2 else k,
              "max_depth": PARAMS["depth"], "num_leaves": 2 ** PARAMS["depth"], "learning_rate": PARAMS["learning_rate"],
              "max_bin": PARAMS["bins"], "lambda_l2": PARAMS["l2"], "min_sum_hessian_in_leaf": PARAMS["min_child_weight"],
              "min_data_in_leaf": 1, "num_threads": 1, "verbose": -1, "deterministic": True, "force_row_wise": True,
              "seed": 0}
    ds = lgb.Dataset(X, y, params=params).construct()
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        bst = lgb.train(params, ds, num_boost_round=rounds)
        best = min(best, time.perf_counter() - t0)
    return {"logloss": log_loss(bst.predict(Xv), yv), "s_per_round": best / rounds}


def xgboost_run(name: str, rounds: int) -> dict[str, Any]:
    import xgboost as xgb

    X, y, Xv, yv, k = load(name)
    params = {"objective": "binary:logistic" if k == 2 else "multi:softprob", "tree_method": "hist",
              "max_depth": PARAMS["depth"], "eta": PARAMS["learning_rate"], "max_bin": PARAMS["bins"],
              "lambda": PARAMS["l2"], "min_child_weight": PARAMS["min_child_weight"], "nthread": 1, "seed": 0}
    if k > 2:
        params["num_class"] = k
    dtrain = xgb.QuantileDMatrix(X, y, max_bin=PARAMS["bins"], nthread=1)
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        bst = xgb.train(params, dtrain, num_boost_round=rounds)
        best = min(best, time.perf_counter() - t0)
    return {"logloss": log_loss(bst.predict(xgb.DMatrix(Xv, nthread=1)), yv), "s_per_round": best / rounds}


# --------------------------------------------------------------------------- fleetmpi


def ours_worker(name: str, rounds: int) -> None:
    """Train on this rank's contiguous share; rank 0 prints one JSON line."""
    from mpi4py import MPI

    from fleetmpi.models.trees import TreeLearner, TreeParams, cut_sample_ids, gather_sample, mpi_reducers
    from kernels import trees as K

    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    X, y, Xv, yv, k = load(name)
    n = X.shape[0]
    lo, hi = rank * n // P, (rank + 1) * n // P
    ids = np.arange(lo, hi, dtype=np.int64)
    p = TreeParams(kind="gbdt", task="binary" if k == 2 else "multiclass", classes=max(k, 2), trees=rounds,
                   **PARAMS)  # type: ignore[arg-type]
    K.warmup()
    sample = gather_sample(X[lo:hi], ids, cut_sample_ids(n, 200_000, p.seed), comm.allgather)
    cuts, ncuts = K.cut_points(sample, p.bins)
    codes = K.bin_rows(X[lo:hi], cuts, ncuts)
    reduce, reduce_max = mpi_reducers(comm)
    best = float("inf")
    for _ in range(REPEAT):
        learner = TreeLearner(p, cuts, ncuts, reduce, reduce_max)
        pred = np.tile(learner.init_base(y[lo:hi]), (hi - lo, 1))
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            learner.fit_round(codes, y[lo:hi], pred, ids)
        comm.Barrier()
        best = min(best, time.perf_counter() - t0)
    if rank == 0:
        prob = learner.ensemble.predict(Xv)
        print(json.dumps({"logloss": log_loss(prob, yv), "s_per_round": best / rounds,
                          "hist_bytes_per_round": learner.hist_bytes / rounds}), flush=True)


def ours_run(name: str, rounds: int, ranks: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [MPIEXEC, "-n", str(ranks), PY, __file__, "--ours", name, "--rounds", str(rounds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", help="worker mode: train fleetmpi on this dataset (under mpiexec)")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--only", choices=list(DATASETS), help="run one dataset")
    args = ap.parse_args()
    if args.ours:
        ours_worker(args.ours, args.rounds or DATASETS[args.ours])
        return 0
    rows = []
    for name, rounds in DATASETS.items():
        if args.only and name != args.only:
            continue
        lg = lightgbm_run(name, rounds)
        xg = xgboost_run(name, rounds)
        o1 = ours_run(name, rounds, 1)
        o2 = ours_run(name, rounds, 2)
        peer = min(lg["logloss"], xg["logloss"])
        rows.append({"dataset": name, "rounds": rounds, "lgbm_logloss": lg["logloss"], "xgb_logloss": xg["logloss"],
                     "ours_logloss": o1["logloss"], "logloss_vs_peer": o1["logloss"] / peer,
                     "lgbm_s_round": lg["s_per_round"], "xgb_ratio": xg["s_per_round"] / lg["s_per_round"],
                     "ours_ratio": o1["s_per_round"] / lg["s_per_round"], "ours_s_round": o1["s_per_round"],
                     "ours2_s_round": o2["s_per_round"], "speedup_2": o1["s_per_round"] / o2["s_per_round"],
                     "hist_KiB_round": o2["hist_bytes_per_round"] / 1024,
                     "same_model_2": o2["logloss"] == o1["logloss"]})
        print(f"{name}: done", flush=True)
    cols = [("dataset", "s"), ("lgbm_logloss", ".4f"), ("xgb_logloss", ".4f"), ("ours_logloss", ".4f"),
            ("logloss_vs_peer", ".3f"), ("lgbm_s_round", ".4f"), ("xgb_ratio", ".2f"), ("ours_ratio", ".2f"),
            ("ours2_s_round", ".4f"), ("speedup_2", ".2f"), ("hist_KiB_round", ".0f"), ("same_model_2", "")]
    print(table("histogram GBDT, 1 thread each (ratios: / LightGBM's s per round; speedup_2: 1 -> 2 ranks)",
                rows, cols))
    print(f"-> {save('trees', rows, params=PARAMS, repeat=REPEAT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
