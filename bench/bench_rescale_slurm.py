"""Rescale latency on the Slurm minicluster (the Slurm row of bench_rescale.py), from a real chain's events.

Runs the quickstart's model and data as a two-phase Slurm job on partition cpu (node[1-2], 2
CPUs each, both on this host), the rule after ``LONG_STEPS`` steps, with ``fleetmpi submit
--wait``, in two shapes (``SHAPES``):

- ``1x1 -> 2x1``: each rank has a CPU of its own, as on any real cluster (2 ranks, 2 host
  cores). This row is the one that compares with the 1.5 s target (``SLURM_LIMIT_S``).
- ``1x2 -> 2x2``: 4 ranks on the host's 2 cores. Its start-up (imports, kernel load) measures
  CPU oversubscription that no cluster has: each rank's CPU time counts twice. Kept to show
  per-rank CPU cuts, not compared with the target.

Each splits the rescale, rule fired -> the next phase's first step, into: checkpoint
(-> rescale event), job exit (-> the batch script's `continue` recorded the exit: ranks, srun
and Python start), submit, scheduling (-> the next batch shell started on its node), begin
(-> its `begin` step holds the lock), srun start-up (-> rank 0's process exists), imports,
open (data and checkpoint), kernels, record and first step; rank0_cpu_s: rank 0's CPU seconds
from its process start to its kernels loaded (what oversubscribed ranks pay in sum). Where rank 0 submitted the next
job ahead (``ahead``: once the checkpoint was committed, while the ranks exit), submit is
checkpoint -> submitted (off the critical path) and scheduling counts from the old job's
exit record (negative where the new shell started before it); begin then includes waiting
for the old job's continuation to release the job dir's lock. Else submit counts from the
exit record and scheduling from the submission.
Skipped, with the reason, where no cluster answers (`sinfo`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SLURM_LIMIT_S = 1.5   # issue 17: on the minicluster, rule fired -> next phase's first step (the 1x1 -> 2x1 row)
TARGET_WORKLOAD = "slurm 1x1 -> 2x1"
LONG_STEPS = 300


def cluster_missing() -> str | None:
    """Return why no Slurm row can be measured here, or None when the cluster answers."""
    if not shutil.which("sinfo"):
        return "no sinfo on PATH (no Slurm client)"
    if not os.environ.get("SLURM_CONF") and not Path("/etc/slurm/slurm.conf").exists():
        return "SLURM_CONF is unset (source /tmp/fleetmpi-minicluster/env.sh, or `make cluster-up`)"
    try:
        out = subprocess.run(["sinfo", "--noheader", "--partition=cpu", "--format=%D %t"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]}"
    nodes = sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.split()[1] in ("idle", "mix", "alloc"))
    return None if nodes >= 2 else f"partition cpu has {nodes} usable node(s); the 2x2 phase needs 2"


def _events(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]


def measure(job: Path) -> list[dict]:
    """Return one row per rescale of a finished Slurm chain: the latency and its parts (s)."""
    ev = _events(job)
    rows = []
    for i, e in enumerate(ev):
        if e["event"] != "rule_fired" or not e["action"].startswith("goto"):
            continue
        after = ev[i + 1:]

        def first(kind: str, after_t: float = 0.0) -> dict:
            return next(x for x in after if x["event"] == kind and x["t"] >= after_t)

        resc, sexit, submit = first("rescale"), first("slurm_exit"), first("slurm_submit")
        # Rank 0 submits the next job once the checkpoint is committed (ahead of the old job's
        # exit); else the continuation submits it after the exit.
        ahead = submit["t"] < sexit["t"]
        queued = sexit["t"] if ahead else submit["t"]
        sstart, start = first("slurm_start", submit["t"]), first("phase_start", submit["t"])
        step = first("first_step", start["t"])
        sm, m = sstart.get("startup") or {}, start.get("startup") or {}
        row = {"rescale": f"{e['phase']} -> {e['action'][5:]}", "to_ranks": start["ranks"], "ahead": "yes" if ahead else "no",
               "latency_s": step["t"] - e["t"], "checkpoint_s": resc["t"] - e["t"],
               "job_exit_s": sexit["t"] - resc["t"], "submit_s": submit["t"] - (resc if ahead else sexit)["t"]}
        if sm.get("shell") and sm.get("process"):
            row.update(scheduling_s=sm["shell"] - queued, begin_s=sstart["t"] - sm["shell"])
        else:
            row.update(scheduling_s=sstart["t"] - queued)
        if m:
            process = m.get("process", m["imported"])
            row.update(srun_s=process - sstart["t"], imports_s=m["imported"] - process,
                       open_s=m["trainer_open"] - m["mpi_ready"], kernels_s=m["kernels_ready"] - m["trainer_open"],
                       record_s=start["t"] - m["kernels_ready"], rank0_cpu_s=start.get("startup_cpu_s"))
        else:
            row.update(startup_s=start["t"] - sstart["t"])
        row["first_step_s"] = step["t"] - start["t"]
        rows.append(row)
    return rows


# (workload name, ranks per node): one node -> two nodes, on partition cpu.
SHAPES = (("slurm 1x1 -> 2x1", 1), ("slurm 1x2 -> 2x2", 2))


def _spec(tmp: Path, ranks_per_node: int) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["data"] = {k: str(QUICKSTART.parent / v) for k, v in doc["data"].items()}
    doc["goal"] = {"max_steps": 2 * LONG_STEPS}
    doc["fleet"] = {"start": "small",
                    "phases": {"small": {"nodes": 1, "ranks_per_node": ranks_per_node, "partition": "cpu"},
                               "wide": {"nodes": 2, "ranks_per_node": ranks_per_node, "partition": "cpu"}},
                    "rules": [{"in": "small", "when": f"phase_steps >= {LONG_STEPS}", "then": {"goto": "wide"}}]}
    doc["scheduler"] = {"backend": "slurm", "submit_backoff_s": 0.2}
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec


def slurm_rows(trials: int, env: dict[str, str] | None = None) -> tuple[list[dict], str | None]:
    """Return (rows of ``trials`` Slurm rescales per shape, shapes interleaved, None) or ([], why skipped)."""
    why = cluster_missing()
    if why is not None:
        return [], why
    # BENCH_PYTHONPATH: measure another checkout (a baseline) with this script; run from there,
    # as `python -m` puts the working folder first on sys.path.
    root = os.environ.get("BENCH_PYTHONPATH", str(ROOT))
    env = {**os.environ, "PYTHONPATH": root, "FLEETMPI_PROGRESS": "none", **(env or {})}
    rows = []
    # The job dir must be on a file system the nodes share: the minicluster's nodes are this host.
    base = Path(os.environ.get("BENCH_SLURM_TMP", tempfile.gettempdir()))
    for trial in range(trials):
        for workload, per_node in SHAPES:
            with tempfile.TemporaryDirectory(dir=base) as tmp:
                job = Path(tmp) / "job"
                proc = subprocess.run([sys.executable, "-m", "fleetmpi.cli", "submit", str(_spec(Path(tmp), per_node)),
                                       "--backend", "slurm", "--wait", "--job-dir", str(job)],
                                      capture_output=True, text=True, env=env, timeout=600, cwd=root)
                if proc.returncode != 0:
                    raise RuntimeError(f"{workload} trial {trial} exited {proc.returncode}: {proc.stderr[-2000:]}")
                rows += [{"trial": trial, "workload": workload, "load_1min": os.getloadavg()[0], **r}
                         for r in measure(job)]
    return rows, None


SLURM_COLUMNS = [("trial", "d"), ("workload", "s"), ("rescale", "s"), ("to_ranks", "d"), ("ahead", "s"),
                 ("latency_s", ".2f"), ("checkpoint_s", ".2f"),
                 ("job_exit_s", ".2f"), ("submit_s", ".2f"), ("scheduling_s", ".2f"), ("begin_s", ".2f"),
                 ("srun_s", ".2f"), ("imports_s", ".2f"), ("open_s", ".2f"), ("kernels_s", ".2f"),
                 ("record_s", ".2f"), ("first_step_s", ".2f"), ("rank0_cpu_s", ".2f"), ("load_1min", ".1f")]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    from common import table
    got, skipped = slurm_rows(int(os.environ.get("BENCH_TRIALS", "1")))
    print(f"slurm row skipped: {skipped}" if skipped else
          table(f"Slurm rescale latency (limit {SLURM_LIMIT_S} s, for {TARGET_WORKLOAD})", got, SLURM_COLUMNS))
