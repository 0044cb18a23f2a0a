"""The chain of Slurm jobs of one fleetmpi job: what was submitted, what ran, how it ended.

``JOB_DIR/slurm/chain.jsonl`` is the record (append-only, one fsynced line per fact, so
writers never tear each other's lines); ``state.json`` mirrors it (``backend_ids``,
``slurm_chain``) whenever no phase runs. Each run of a batch script also leaves
``slurm/JOBID.RESTART.exit`` (its exit code, written by the script itself) and
``slurm/JOBID.RESTART.env.json`` (the allocation it got).

Records: ``submit`` (a new Slurm job), ``requeue`` (the same job again), ``start`` (a batch
script began), ``exit`` (its phase ended), ``end`` (the chain stopped, with the final code),
``withdraw`` (a job submitted ahead by a phase's rank 0 was cancelled before it began, as the
phase did not end in that rescale: it is no run of the chain).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fleetmpi.jobdir import JobDir, atomic_write_bytes, make_dirs, read_lines
from fleetmpi.launch.slurm.cmd import SlurmCommandError, sacct_states, squeue_states

# What the allocation looked like, as the batch script saw it.
SHAPE_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS_PER_NODE",
              "SLURM_NTASKS", "SLURM_CPUS_PER_TASK", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST",
              "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "SLURMD_NODENAME",
              "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS")


def slurm_dir(jd: JobDir) -> Path:
    return jd.root / "slurm"


def chain_path(jd: JobDir) -> Path:
    return slurm_dir(jd) / "chain.jsonl"


def exit_path(jd: JobDir, job_id: str, restart: int) -> Path:
    return slurm_dir(jd) / f"{job_id}.{restart}.exit"


def env_path(jd: JobDir, job_id: str, restart: int) -> Path:
    return slurm_dir(jd) / f"{job_id}.{restart}.env.json"


def log_path(jd: JobDir, job_id: str) -> Path:
    return jd.logs / f"slurm-{job_id}.out"


def record(jd: JobDir, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one fact to the chain (fsynced)."""
    rec = {"t": time.time(), "kind": kind, **fields}
    make_dirs(slurm_dir(jd))
    jd.append_line(chain_path(jd), rec, sync=True)
    return rec


def read_exit(jd: JobDir, job_id: str, restart: int) -> int | None:
    """Return the exit code a batch script wrote, or None when it wrote none."""
    try:
        text = exit_path(jd, job_id, restart).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def write_env(jd: JobDir, job_id: str, restart: int, env: dict[str, str]) -> None:
    atomic_write_bytes(env_path(jd, job_id, restart), (json.dumps(env, indent=1, sort_keys=True) + "\n").encode())


def runs(jd: JobDir) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Return (runs in order, the end record if the chain has ended since its last submission)."""
    out: list[dict[str, Any]] = []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    end: dict[str, Any] | None = None
    for rec in read_lines(chain_path(jd)):
        kind = rec.get("kind")
        jid, restart = str(rec.get("job_id", "")), int(rec.get("restart", 0))
        if kind in ("submit", "requeue"):
            run = {"job_id": jid, "restart": restart, "phase": rec.get("phase"), "shape": rec.get("shape"),
                   "by": rec.get("by"), "submitted": rec["t"], "exit_code": None, "env": None, "stop": None}
            out.append(run)
            by_key[(jid, restart)] = run
            end = None
        elif kind in ("start", "exit"):
            known = by_key.get((jid, restart))
            if known is not None:
                run = known
            else:  # Slurm requeued the job by itself (node failure with --requeue)
                run = {"job_id": jid, "restart": restart, "phase": rec.get("phase"), "shape": None,
                       "by": "slurm", "submitted": None, "exit_code": None, "env": None, "stop": None}
                out.append(run)
                by_key[(jid, restart)] = run
                end = None
            if kind == "start":
                run["env"] = rec.get("env")
                run["started"] = rec["t"]
            else:
                run["exit_code"] = rec.get("exit_code")
                run["exited"] = rec["t"]
                run["signal"] = rec.get("signal") or None
                run["stop"] = rec.get("stop")
        elif kind == "withdraw":
            gone = by_key.pop((jid, restart), None)
            if gone is not None:
                out.remove(gone)
        elif kind == "end":
            end = rec
    return out, end


def live_job_ids(chain: list[dict[str, Any]]) -> list[str]:
    """Return the Slurm job ids of the chain's runs whose phase has not ended, oldest first.

    Usually one; two in a Slurm rescale's last moments, when rank 0 has submitted the next
    phase ahead (``batch.submit_ahead``) while its own job still exits: cancelling only the
    newest would leave the old one to continue the chain.
    """
    ids: list[str] = []
    for r in chain:
        if "exited" not in r and r["job_id"] not in ids:
            ids.append(r["job_id"])
    return ids


def submissions(jd: JobDir) -> int:
    """Return how many ``submit`` records the chain holds (the next submission's index)."""
    return sum(1 for rec in read_lines(chain_path(jd)) if rec.get("kind") == "submit")


def intent_recorded(jd: JobDir, key: str) -> bool:
    """Return whether an earlier process already set out to submit ``key`` (an ``intent`` record)."""
    return any(rec.get("kind") == "intent" and rec.get("key") == key for rec in read_lines(chain_path(jd)))


def sync_state(jd: JobDir, **fields: Any) -> dict[str, Any]:
    """Mirror the chain into state.json (call only while no phase of this job runs)."""
    chain, _ = runs(jd)
    ids: list[str] = []
    for r in chain:
        if r["job_id"] not in ids:
            ids.append(r["job_id"])
    compact = [{k: r.get(k) for k in ("job_id", "restart", "phase", "shape", "by", "exit_code", "stop")}
               for r in chain]
    return jd.update_state(backend_ids=ids, slurm_chain=compact, **fields)


def run_states(jd: JobDir, chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return each run with ``state`` and ``source``: exit file first, then squeue, then sacct.

    A run with no exit file that squeue no longer knows (and accounting cannot tell) is
    UNKNOWN, never taken as completed. ONE squeue call covers all runs.
    """
    out = []
    need: list[str] = []
    for r in chain:
        r = dict(r)
        code = read_exit(jd, r["job_id"], r["restart"])
        if code is not None:
            r.update(exit_code=code, state="EXITED", source="exit file")
        else:
            r.update(state=None, source=None)
            need.append(r["job_id"])
        out.append(r)
    if not need:
        return out
    latest_restart = {r["job_id"]: r["restart"] for r in out}
    try:
        queued = squeue_states(need)
        query_error = None
    except SlurmCommandError as e:
        queued, query_error = {}, str(e)
    missing = [j for j in need if j not in queued]
    accounted = {}
    if missing:
        try:
            accounted = sacct_states(missing)
        except SlurmCommandError:
            accounted = {}
    for r in out:
        if r["state"] is not None:
            continue
        jid = r["job_id"]
        if r["restart"] < latest_restart[jid]:
            # An earlier run of a requeued job that left no exit file: killed by the requeue.
            r.update(state="UNKNOWN", source="requeued")
        elif jid in queued:
            st = queued[jid]
            # Slurm says the job ended, but the script wrote no exit code: it did not finish.
            r.update(state="UNKNOWN" if st == "COMPLETED" else st, source="squeue", slurm_state=st)
        elif jid in accounted:
            st, _code = accounted[jid]
            r.update(state="UNKNOWN" if st == "COMPLETED" else st, source="sacct", slurm_state=st)
        else:
            r.update(state="UNKNOWN", source="none" if query_error is None else f"squeue failed: {query_error}")
    return out
