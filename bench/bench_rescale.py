"""Start-up and rescale latency of local runs, from real runs' events.

Cold start: a one-phase quickstart (2 ranks, 3 steps) from `fleetmpi run` to its first
step, with an empty numba cache (``NUMBA_CACHE_DIR`` a fresh folder) as a first run
after install without `python -m fleetmpi.engine.precompile` finds it, with that cache filled by
the precompile step (what `make install` does now), and warm (a second run). Limit: the
precompiled first run within 2 s of the warm one.

Rescale: runs examples/quickstart.yaml (2 -> 3 -> 1 ranks) and splits each rescale into
checkpoint (rule fired -> rescale event), exit (-> the launcher saw mpiexec end), launch
(-> the launcher started the next mpiexec), start-up (-> phase_start: mpiexec,
interpreter, imports, data open, checkpoint read, kernel load) and the first step; the
start-up further by rank 0's marks in phase_start (process created, worker imported, MPI
ready, trainer open, kernels loaded).
"""

from __future__ import annotations

import json
import os
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
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "FLEETMPI_PROGRESS": "none"}
COLD_LIMIT_S = 2.0        # precompiled first run: at most this much slower to its first step than a warm run
RESCALE_LIMIT_S = 0.8     # issue 17: local rule fired -> next phase's first step


def _events(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def _run(spec: Path, job: Path, env: dict[str, str]) -> float:
    """Run `fleetmpi run`; return seconds from the command's start to the first_step event."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fleetmpi.cli", "run", str(spec), "--job-dir", str(job)], check=True,
                   capture_output=True, env=env)
    first = next(e for e in _events(job) if e["event"] == "first_step")
    return float(first["t"] - t0)


def cold_start(trials: int) -> list[dict]:
    """Return rows: seconds to the first step from an empty cache, after precompile, and warm."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["data"] = {k: str(QUICKSTART.parent / v) for k, v in doc["data"].items()}
    doc["goal"] = {"max_steps": 3}
    doc["fleet"] = {"start": "small", "phases": {"small": doc["fleet"]["phases"]["small"]}}
    rows = []
    for trial in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "cold.yaml"
            spec.write_text(yaml.safe_dump(doc))
            times: dict[str, float] = {}
            cache = Path(tmp) / "cache-empty"
            times["empty_cache_s"] = _run(spec, Path(tmp) / "j0", {**ENV, "NUMBA_CACHE_DIR": str(cache)})
            env = {**ENV, "NUMBA_CACHE_DIR": str(Path(tmp) / "cache-install")}
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "fleetmpi.engine.precompile", "--quiet"], check=True, env=env, cwd=ROOT)
            times["precompile_s"] = time.time() - t0
            times["precompiled_s"] = _run(spec, Path(tmp) / "j1", env)
            times["warm_s"] = _run(spec, Path(tmp) / "j2", env)
            rows.append({"trial": trial, **times, "extra_cold_s": times["empty_cache_s"] - times["warm_s"],
                         "extra_precompiled_s": times["precompiled_s"] - times["warm_s"]})
    return rows


def measure(job: Path) -> list[dict]:
    """Return one row per rescale of a finished job: the latency and its parts (s)."""
    ev = _events(job)
    rows = []
    for i, e in enumerate(ev):
        if e["event"] != "rule_fired" or not e["action"].startswith("goto"):
            continue
        after = ev[i + 1:]
        resc = next(x for x in after if x["event"] == "rescale")
        exit_ = next(x for x in after if x["event"] == "phase_exit")
        launch = next(x for x in after if x["event"] == "launch")
        start = next(x for x in after if x["event"] == "phase_start")
        first = next(x for x in after if x["event"] == "first_step" and x["t"] >= start["t"])
        rows.append({"rescale": f"{e['phase']} -> {e['action'][5:]}", "to_ranks": start["ranks"],
                     "latency_s": first["t"] - e["t"], "checkpoint_s": resc["t"] - e["t"],
                     "exit_s": exit_["t"] - resc["t"], "launch_s": launch["t"] - exit_["t"],
                     "startup_s": start["t"] - launch["t"], "first_step_s": first["t"] - start["t"],
                     **_startup_split(launch["t"], start)})
    return rows


def _startup_split(launched: float, start: dict) -> dict[str, float]:
    """Split launch -> phase_start by rank 0's start-up marks (empty where the event has none)."""
    m = start.get("startup")
    if not m:
        return {}
    process = m.get("process", m["imported"])
    return {"mpiexec_s": process - launched, "imports_s": m["imported"] - process,
            "mpi_init_s": m["mpi_ready"] - m["imported"], "open_s": m["trainer_open"] - m["mpi_ready"],
            "kernels_s": m["kernels_ready"] - m["trainer_open"], "record_s": start["t"] - m["kernels_ready"]}


def rescales(trials: int) -> list[dict]:
    """Return the rescale rows of ``trials`` quickstart runs."""
    rows = []
    for trial in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job"
            subprocess.run([sys.executable, "-m", "fleetmpi.cli", "run", str(QUICKSTART), "--job-dir", str(job)],
                           check=True, capture_output=True, env=ENV)
            rows += [{"trial": trial, **r} for r in measure(job)]
    return rows


def main() -> None:
    trials = int(os.environ.get("BENCH_TRIALS", "3"))
    load = os.getloadavg()[0]
    cold = cold_start(trials)
    print(table(f"cold start, `fleetmpi run` -> first step, 2 ranks (load {load:.1f}; "
                f"limit: precompiled within {COLD_LIMIT_S:.0f} s of warm)", cold,
                [("trial", "d"), ("empty_cache_s", ".2f"), ("precompile_s", ".2f"), ("precompiled_s", ".2f"),
                 ("warm_s", ".2f"), ("extra_cold_s", ".2f"), ("extra_precompiled_s", ".2f")]))
    med = statistics.median(r["extra_precompiled_s"] for r in cold)
    print(f"median extra over warm: empty cache {statistics.median(r['extra_cold_s'] for r in cold):.2f} s, "
          f"precompiled {med:.2f} s ({'within' if med <= COLD_LIMIT_S else 'OVER'} the {COLD_LIMIT_S:.0f} s limit)")
    rows = rescales(trials)
    print(table(f"local rescale latency, rule fired -> first step of the next phase (limit {RESCALE_LIMIT_S} s)",
                rows, [("trial", "d"), ("rescale", "s"), ("to_ranks", "d"), ("latency_s", ".2f"),
                       ("checkpoint_s", ".2f"), ("exit_s", ".2f"), ("launch_s", ".2f"), ("startup_s", ".2f"),
                       ("mpiexec_s", ".2f"), ("imports_s", ".2f"), ("mpi_init_s", ".2f"), ("open_s", ".2f"),
                       ("kernels_s", ".2f"), ("record_s", ".2f"), ("first_step_s", ".2f")]))
    lat = statistics.median(r["latency_s"] for r in rows)
    print(f"median rescale latency {lat:.2f} s ({'within' if lat <= RESCALE_LIMIT_S else 'OVER'} "
          f"the {RESCALE_LIMIT_S} s limit)")
    save("rescale_latency", rows, load_1min=load, limit_s=RESCALE_LIMIT_S)
    save("cold_start", cold, load_1min=load, limit_s=COLD_LIMIT_S)


if __name__ == "__main__":
    main()
