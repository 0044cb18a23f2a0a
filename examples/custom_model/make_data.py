"""Write Poisson counts for the custom-model example: OUT/train.h5 and OUT/valid.h5 (X float32, y float32)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import h5py
import numpy as np


def write(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    """Write X and y to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("X", data=X)
        f.create_dataset("y", data=y)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def make(out: Path, n: int, d: int, seed: int) -> np.ndarray:
    """Write n rows of d features with y ~ Poisson(exp(x.w + b)) split 80/20; return the true (w, b)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, (n, d)).astype(np.float32)
    true = np.append(rng.normal(0.0, 0.4 / np.sqrt(d), d), 0.5)
    y = rng.poisson(np.exp(X.astype(np.float64) @ true[:d] + true[d])).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    cut = n * 4 // 5
    write(out / "train.h5", X[:cut], y[:cut])
    write(out / "valid.h5", X[cut:], y[cut:])
    return true


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    true = make(args.out, args.n, args.d, args.seed)
    print(f"wrote {args.out}/train.h5 and valid.h5; true weights {np.round(true[:-1], 3).tolist()}, bias {true[-1]:.3f}")


if __name__ == "__main__":
    main()
