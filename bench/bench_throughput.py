"""Training throughput at 1 rank vs scikit-learn's SGDClassifier on the same data.

Both fit logistic regression for the same number of epochs over the same synthetic
binary set (X float32 200000 x 64). fleetmpi's figure is the whole `fleetmpi run` wall
time of the phase's steps (HDF5 reads, kernel, sync, optimizer, monitor) from its metrics;
scikit-learn's is fit() on arrays already in memory (no I/O), per-sample SGD. Each figure is
the median of REPEAT runs (spread: (max - min) / median): at 3 epochs a fleetmpi run trains
for 0.1-0.2 s, and single runs of batch 1024 ranged from 4.5 to 7.5 M samples/s on a quiet box.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

sys.path.insert(0, os.path.dirname(__file__))
import fleetrun
from common import save, table

EPOCHS = 3
REPEAT = 3


def run_fleetmpi(data: Path, tmp: Path, batch: int, k: int) -> float:
    """Return fleetmpi's samples/s at 1 rank (first step -> goal) on ``data``, run ``k``."""
    return fleetrun.run(fleetrun.throughput_spec(data, batch, EPOCHS), tmp, f"b{batch}-{k}").train_rate(batch)


def _median_spread(xs: list[float]) -> tuple[float, float]:
    m = statistics.median(xs)
    return m, (max(xs) - min(xs)) / m


def main() -> None:
    from sklearn.linear_model import SGDClassifier
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        subprocess.run([sys.executable, "-m", "fleetmpi.cli", "make-data", "--task", "binary", "--n", "250000",
                        "--d", "64", "--valid-fraction", "0.2", "--out", str(tmp / "data")], check=True,
                       capture_output=True)
        with h5py.File(tmp / "data" / "train.h5") as f:
            X, y = f["X"][...], f["y"][...]
        import warnings
        sks = []
        for _ in range(REPEAT):
            clf = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=EPOCHS, tol=None, random_state=0)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                clf.fit(X, y)
            sks.append(EPOCHS * len(y) / (time.perf_counter() - t0))
        sk, spread = _median_spread(sks)
        rows = [{"system": "scikit-learn SGDClassifier (batch 1, in memory)", "samples_per_s": sk, "spread": spread,
                 "ratio": 1.0}]
        for batch in (256, 1024, 4096):
            sps, spread = _median_spread([run_fleetmpi(tmp / "data", tmp, batch, k) for k in range(REPEAT)])
            rows.append({"system": f"fleetmpi 1 rank, batch {batch} (reads the HDF5 file)", "samples_per_s": sps,
                         "spread": spread, "ratio": sps / sk})
    print(table(f"throughput, logistic regression, 200000 x 64, {EPOCHS} epochs, median of {REPEAT} "
                "(ratio vs scikit-learn)", rows,
                [("system", "s"), ("samples_per_s", ".0f"), ("spread", ".2f"), ("ratio", ".2f")]))
    save("throughput_1rank", rows, epochs=EPOCHS, repeat=REPEAT)


if __name__ == "__main__":
    main()
