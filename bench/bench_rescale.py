"""Start-up and rescale latency of local runs, from real runs' events.

Cold start: a one-phase quickstart (2 ranks, 3 steps) from `fleetmpi run` to its first
step, with an empty numba cache (``NUMBA_CACHE_DIR`` a fresh folder) as a first run
after install without `python -m fleetmpi.engine.precompile` finds it, with that cache filled by
the precompile step (what `make install` does now), and warm (a second run). Limit: the
precompiled first run within 2 s of the warm one.

Rescale: runs examples/quickstart.yaml (2 -> 3 -> 1 ranks), as it is and with phases of
300 steps ("long phases"), each with FLEETMPI_PRESTART=off (the next phase's mpiexec starts
once the old one ended) and next (it was pre-started and waits), and splits each rescale into
checkpoint (rule fired -> rescale event), exit (-> the launcher saw mpiexec end), launch
(-> the launcher started the next mpiexec, or said go to the pre-started one), start-up
(-> phase_start) and the first step; the start-up further by rank 0's marks in phase_start
(process created, worker imported, MPI ready, trainer open, kernels loaded; for a
pre-started phase: word seen, checkpoint read, and how long before the rule it was ready).
The Slurm rows come from bench_rescale_slurm.py (skipped, with the reason, without a cluster):
1x1 -> 2x1 (a CPU per rank: the row held to the 1.5 s target) and 1x2 -> 2x2 (4 ranks on 2
cores, oversubscribed).
BENCH_PARTS=cold,local,slurm picks the parts.
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
from bench_rescale_slurm import SHAPES, SLURM_COLUMNS, SLURM_LIMIT_S, TARGET_WORKLOAD, slurm_rows
from common import save, table

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# BENCH_PYTHONPATH: the rescale rows of another checkout (a baseline), run from its folder
# (`python -m` puts the working folder first on sys.path).
CODE = os.environ.get("BENCH_PYTHONPATH", str(ROOT))
ENV = {**os.environ, "PYTHONPATH": CODE, "FLEETMPI_PROGRESS": "none"}
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
    """Return one row per rescale of a finished job: the latency and its parts (s).

    A pre-started phase (``handover`` event) started up before the rule fired: its row
    splits the critical path as checkpoint, exit, handover (-> the launcher's go), word
    (-> the ranks saw it), open (state and checkpoint read), record and first step, and
    says how long before the rule it was started (lead_s) and whether it was ready then.
    """
    ev = _events(job)
    rows = []
    for i, e in enumerate(ev):
        if e["event"] != "rule_fired" or not e["action"].startswith("goto"):
            continue
        after = ev[i + 1:]
        resc = next(x for x in after if x["event"] == "rescale")
        exit_ = next(x for x in after if x["event"] == "phase_exit")
        launch = next(x for x in after if x["event"] in ("launch", "handover") and x["t"] >= exit_["t"])
        start = next(x for x in after if x["event"] == "phase_start")
        first = next(x for x in after if x["event"] == "first_step" and x["t"] >= start["t"])
        row = {"rescale": f"{e['phase']} -> {e['action'][5:]}", "to_ranks": start["ranks"],
               "prestarted": launch["event"] == "handover",
               "latency_s": first["t"] - e["t"], "checkpoint_s": resc["t"] - e["t"],
               "exit_s": exit_["t"] - resc["t"], "launch_s": launch["t"] - exit_["t"],
               "startup_s": start["t"] - launch["t"], "first_step_s": first["t"] - start["t"]}
        if row["prestarted"]:
            pre = [x for x in ev[:i] if x["event"] == "prestart" and x["phase"] == launch["phase"]]
            row.update(_standby_split(e["t"], launch["t"], pre[-1]["t"] if pre else None, start))
        else:
            row.update(_startup_split(launch["t"], start))
        rows.append(row)
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


def _standby_split(fired: float, handover: float, prestarted: float | None, start: dict) -> dict[str, float]:
    """Split a pre-started phase's handover -> phase_start, and its start-up done before the rule fired."""
    m = start.get("startup") or {}
    if "go" not in m:
        return {}
    process = m.get("process", m["imported"])
    out = {"word_s": m["go"] - handover, "open_s": m["trainer_open"] - m["go"],
           "record_s": start["t"] - m["trainer_open"],
           # off the critical path: the standby's own start-up, and how early it was ready
           "imports_s": m["imported"] - process, "kernels_s": m["standby_ready"] - m["mpi_ready"],
           "ready_before_rule_s": fired - m["standby_ready"]}
    if prestarted is not None:
        out.update(mpiexec_s=process - prestarted, lead_s=fired - prestarted)
    return out


# The quickstart's phases last well under a second of training each, less than a rank's
# start-up on a loaded 2-core box: the same job with phases of a few seconds (300 steps)
# shows a rescale where the pre-started phase had the time to start up.
LONG_PHASES = {"small": "phase_steps >= 300", "wide": "phase_steps >= 300"}


def _quickstart(tmp: Path, long_phases: bool) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["data"] = {k: str(QUICKSTART.parent / v) for k, v in doc["data"].items()}
    if long_phases:
        doc["goal"] = {"max_steps": 800}
        for rule in doc["fleet"]["rules"]:
            rule["when"] = LONG_PHASES[rule["in"]]
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec


def rescales(trials: int, prestart: str = "next", long_phases: bool = False) -> list[dict]:
    """Return the rescale rows of ``trials`` quickstart runs (FLEETMPI_PRESTART=``prestart``)."""
    rows = []
    for trial in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job"
            spec = _quickstart(Path(tmp), long_phases)
            subprocess.run([sys.executable, "-m", "fleetmpi.cli", "run", str(spec), "--job-dir", str(job)],
                           check=True, capture_output=True, env={**ENV, "FLEETMPI_PRESTART": prestart}, cwd=CODE)
            rows += [{"trial": trial, "workload": "long phases" if long_phases else "quickstart",
                      "prestart": prestart, "load_1min": os.getloadavg()[0], **r} for r in measure(job)]
    return rows


RESCALE_COLUMNS = [("trial", "d"), ("workload", "s"), ("prestart", "s"), ("rescale", "s"), ("to_ranks", "d"),
                   ("latency_s", ".2f"), ("checkpoint_s", ".2f"), ("exit_s", ".2f"), ("launch_s", ".2f"),
                   ("startup_s", ".2f"), ("word_s", ".3f"), ("open_s", ".2f"), ("record_s", ".2f"),
                   ("first_step_s", ".2f"), ("mpiexec_s", ".2f"), ("imports_s", ".2f"), ("kernels_s", ".2f"),
                   ("lead_s", ".2f"), ("ready_before_rule_s", ".2f"), ("load_1min", ".1f")]


def local_rescales(trials: int) -> list[dict]:
    """Return rescale rows with and without pre-start, quickstart and long phases, interleaved per trial."""
    rows = []
    for trial in range(trials):
        for long_phases in (False, True):
            for prestart in ("off", "next"):
                rows += [{**r, "trial": trial} for r in rescales(1, prestart, long_phases)]
    return rows


def main() -> None:
    trials = int(os.environ.get("BENCH_TRIALS", "3"))
    parts = os.environ.get("BENCH_PARTS", "cold,local,slurm").split(",")
    load = os.getloadavg()[0]
    if "cold" in parts:
        cold = cold_start(trials)
        print(table(f"cold start, `fleetmpi run` -> first step, 2 ranks (load {load:.1f}; "
                    f"limit: precompiled within {COLD_LIMIT_S:.0f} s of warm)", cold,
                    [("trial", "d"), ("empty_cache_s", ".2f"), ("precompile_s", ".2f"), ("precompiled_s", ".2f"),
                     ("warm_s", ".2f"), ("extra_cold_s", ".2f"), ("extra_precompiled_s", ".2f")]))
        med = statistics.median(r["extra_precompiled_s"] for r in cold)
        print(f"median extra over warm: empty cache {statistics.median(r['extra_cold_s'] for r in cold):.2f} s, "
              f"precompiled {med:.2f} s ({'within' if med <= COLD_LIMIT_S else 'OVER'} the {COLD_LIMIT_S:.0f} s limit)")
        save("cold_start", cold, load_1min=load, limit_s=COLD_LIMIT_S)
    rows: list[dict] = []
    if "local" in parts:
        rows = local_rescales(trials)
        print(table(f"local rescale latency, rule fired -> first step of the next phase (limit {RESCALE_LIMIT_S} s)",
                    rows, RESCALE_COLUMNS))
        for workload in ("quickstart", "long phases"):
            for prestart in ("off", "next"):
                sel = [r["latency_s"] for r in rows if r["workload"] == workload and r["prestart"] == prestart]
                lat = statistics.median(sel)
                print(f"{workload}, FLEETMPI_PRESTART={prestart}: median rescale latency {lat:.2f} s over "
                      f"{len(sel)} ({'within' if lat <= RESCALE_LIMIT_S else 'OVER'} the {RESCALE_LIMIT_S} s limit)")
    skipped: str | None = "not asked for (BENCH_PARTS)"
    if "slurm" in parts:
        srows, skipped = slurm_rows(trials)
        if skipped:
            print(f"Slurm rescale row skipped: {skipped}")
        else:
            print(table(f"Slurm rescale latency on the minicluster (limit {SLURM_LIMIT_S} s)", srows, SLURM_COLUMNS))
            for workload, _ in SHAPES:
                lat = statistics.median(r["latency_s"] for r in srows if r["workload"] == workload)
                verdict = (f"{'within' if lat <= SLURM_LIMIT_S else 'OVER'} the {SLURM_LIMIT_S} s limit"
                           if workload == TARGET_WORKLOAD else "oversubscribed: 4 ranks on 2 cores, not held to it")
                print(f"{workload}: median rescale latency {lat:.2f} s ({verdict})")
        rows += srows
    if rows:
        save("rescale_latency", rows, load_1min=load, limit_s=RESCALE_LIMIT_S, slurm_limit_s=SLURM_LIMIT_S,
             slurm_skipped=skipped)


if __name__ == "__main__":
    main()
