"""`make bench`'s closing plot (bench/run.py) reads the result files the benchmarks write.

The plot ran last, after every benchmark: a column renamed in one benchmark made the
whole `make bench` exit 1 at the end (KeyError in plot). Plotting the committed result
files keeps the plot and the files' columns in step.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
run = importlib.import_module("run")


def test_plot_draws_the_committed_results(tmp_path: Path) -> None:
    results = BENCH / "results"
    needed = ("kernels", "rescale_latency", "sync_dense_2ranks", "throughput_1rank", "compress_bytes",
              "peers_time_to_loss", "scaling")
    missing = [n for n in needed if not (results / f"{n}.json").exists()]
    assert not missing, f"committed bench results missing: {missing}"
    out = tmp_path / "bench.png"
    run.plot(out, results)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 50_000     # seven panels drawn, not an empty figure

