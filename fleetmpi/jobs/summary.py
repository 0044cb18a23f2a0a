"""One record of a job for every reader: `run --json`, `submit --json`, `status --json`, ``Job.result()``.

The same fact has the same name everywhere: ``exit_code`` is the training's final exit code
(None while it runs), ``outcome`` how it ended, ``metrics`` the final metrics (their
``loss`` as ``loss_meaning`` says), ``chain`` the phases run in order with their shape,
rank count, scheduler job id and exit code, for the local backend as for Slurm.
"""

from __future__ import annotations

from typing import Any

from fleetmpi.jobdir import JobDir

# The names the run's outcome carries (fleetmpi.engine.monitor.outcome), None before the end.
OUTCOME_KEYS = ("target_met", "outcome", "reason", "metrics", "best_step", "best_metrics", "model_step")

# What ``metrics.loss`` is (the rule metric ``loss``): metrics.jsonl's per-step ``loss`` is the
# last batch's, its ``loss_ema`` this one.
LOSS_MEANING = ("metrics.loss: exponential moving average of the training loss per batch (weight 0.05 on each "
                "new batch, carried across phases); valid_loss: mean over the whole validation set; a running "
                "job's progress loss (status) and metrics.jsonl's loss: the last batch's")

# The keys of every record, in order (tests/unit/test_job_record.py checks each reader has them).
RECORD_KEYS = ("job_dir", "status", "phase", "backend", "exit_code", *OUTCOME_KEYS, "loss_meaning", "model",
               "chain", "timeouts", "preemptions")


def outcome_fields(state: dict[str, Any]) -> dict[str, Any]:
    """Return the run's outcome as state.json holds it (every key of OUTCOME_KEYS; None before the end)."""
    out = state.get("outcome")
    out = out if isinstance(out, dict) else {}
    return {k: out.get(k) for k in OUTCOME_KEYS}


def local_chain(jd: JobDir) -> list[dict[str, Any]]:
    """Return the phases a local job launched, in order: phase, shape, ranks, exit code (from its events)."""
    from fleetmpi import spec as specmod
    try:
        spec: Any = specmod.load(jd.spec)
    except Exception:   # a job dir whose spec no longer loads still reports its phases
        spec = None
    chain: list[dict[str, Any]] = []
    for ev in jd.read_events():
        if ev.get("event") in ("launch", "handover"):   # handover: a pre-started phase takes over
            phase = ev.get("phase")
            shape = spec.phase(phase).shape() if spec is not None and phase in spec.fleet.phases else None
            chain.append({"job_id": None, "phase": phase, "shape": shape, "ranks": ev.get("ranks"),
                          "by": "local", "state": "RUNNING", "exit_code": None, "started": ev.get("t"),
                          "seconds": None})
        elif ev.get("event") == "phase_exit" and chain and chain[-1]["exit_code"] is None:
            chain[-1].update(exit_code=ev.get("exit_code"), seconds=ev.get("seconds"), state="EXITED")
    return chain


def job_summary(jd: JobDir, exit_code: int | None = None) -> dict[str, Any]:
    """Return the job's common record (RECORD_KEYS); ``exit_code`` overrides the one read from the job dir."""
    from fleetmpi.engine.monitor import finite_or_none
    from fleetmpi.launch.slurm.backend import status_report
    state = jd.read_state()
    report = status_report(jd)
    ended = outcome_fields(state)
    chain = report["chain"]
    if not chain:
        chain = local_chain(jd)
    else:
        for run in chain:   # a Slurm phase's rank count, as a local one has it
            alloc = run.get("allocation") or {}
            n, per = str(alloc.get("nodes")), str(alloc.get("ntasks_per_node"))
            run.setdefault("ranks", int(n) * int(per) if n.isdigit() and per.isdigit() else None)
    if exit_code is None:
        exit_code = report["final_exit_code"]
    if exit_code is None and isinstance(state.get("outcome"), dict):
        exit_code = state["outcome"].get("exit_code")
    if exit_code is None and state.get("status") != "RUNNING" and chain and chain[-1].get("exit_code") is not None:
        exit_code = chain[-1]["exit_code"]    # a local run that ended without an outcome (failed, stopped)
    record = {"job_dir": str(jd.root), "status": report["status"], "phase": report["phase"],
              "backend": report["backend"], "exit_code": exit_code, **ended,
              "reason": ended["reason"] or report["reason"], "loss_meaning": LOSS_MEANING,
              "model": str(jd.model) if jd.model.exists() else None, "chain": chain,
              "timeouts": report["timeouts"], "preemptions": report["preemptions"]}
    return dict(finite_or_none(record))
