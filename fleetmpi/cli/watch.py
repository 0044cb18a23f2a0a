"""Watching a job from its job dir: the live part of ``status`` and ``events --follow``.

Everything here reads only the job dir (state.json, the tails of metrics.jsonl and
events.jsonl), so it works for a job run by hand, by a manager or on Slurm alike.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from fleetmpi.jobdir import JobDir
from fleetmpi.lock import writer_may_be_alive

TAIL_BYTES = 65536
ACTIVE = ("RUNNING", "RESCALING", "QUEUED", "STARTING")
NOT_ENDED = (*ACTIVE, "NEW")


def _tail_records(path: Any, tail_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """Return the whole JSON lines in the last ``tail_bytes`` of a .jsonl file, oldest first."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if size > tail_bytes:
        lines = lines[1:]   # cut in the middle
    out = []
    for line in lines[:-1]:   # the last piece is unfinished (or empty)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def live(jd: JobDir) -> dict[str, Any]:
    """Return what a person watching the job wants: progress, latest valid metrics, phase and time in it, approval."""
    state = jd.read_state()
    metrics = _tail_records(jd.metrics)
    last = metrics[-1] if metrics else {}
    evals = [m for m in metrics if m.get("eval")]
    valid = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("valid_")}
    phase_since = None
    for ev in reversed(_tail_records(jd.events)):
        if ev.get("event") == "phase_start":
            phase_since = ev.get("t")
            break
    info: dict[str, Any] = {k: last.get(k) for k in ("step", "epoch", "loss", "sync_bytes_per_step", "ranks")}
    info.update(valid)
    info["phase"] = state.get("phase")
    info["phase_elapsed_s"] = (time.time() - float(phase_since)) if isinstance(phase_since, (int, float)) else None
    pending = state.get("pending_approval")
    if isinstance(pending, dict) and pending.get("goto"):
        info["pending_approval"] = {**pending, "command": f"fleetmpi approve {jd.root}"}
    else:
        info["pending_approval"] = None
    return info


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def live_lines(info: dict[str, Any], status: str | None) -> list[str]:
    """Return the lines ``status`` prints for ``live`` (progress only while the job is active)."""
    from fleetmpi.rules import format_bytes
    out = []
    if status in ACTIVE and info.get("step") is not None:
        parts = [f"step {info['step']}", f"epoch {info['epoch']:.3f}", f"loss {info['loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in info.items() if k.startswith("valid_") and isinstance(v, (int, float))]
        if info.get("sync_bytes_per_step") is not None:
            parts.append(f"sync {format_bytes(info['sync_bytes_per_step'])}/step")
        where = f"phase {info['phase']} x{info['ranks']}"
        if info.get("phase_elapsed_s") is not None:
            where += f" for {_dur(info['phase_elapsed_s'])}"
        out.append(f"  {where}: " + ", ".join(parts))
    p = info.get("pending_approval")
    if p:
        out.append(f"  rescale to {p['goto']} waits for approval since step {p.get('step')} (rule {p.get('rule')}); "
                   f"training goes on in phase {info['phase']} meanwhile: {p['command']}")
    return out


def format_event(ev: dict[str, Any]) -> str:
    ev = dict(ev)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.pop("t", 0)))
    kind = ev.pop("event", "?")
    ev.pop("host", None)
    return f"{when} {kind:<18} " + " ".join(f"{k}={v}" for k, v in ev.items())


# After state.json says the job ended, how long `events --follow` waits for the job dir's
# writer to let go (its last events come after the status: the launcher's phase_exit).
WRITER_GRACE_S = 10.0


def job_over(jd: JobDir, grace_s: float = WRITER_GRACE_S) -> Callable[[], bool]:
    """Return a check: the status says ended, and the job dir's writer has gone (or grace_s passed).

    The ranks' rank 0 writes the final status (STOPPED, COMPLETED...) before the launcher
    writes phase_exit and lets go of the lock; a follower that stopped at the status lost
    those last lines (seen: tests/mpi/test_watch.py, under load).
    """
    since: float | None = None   # when the status was first seen ended

    def check() -> bool:
        nonlocal since
        if jd.read_state().get("status") in NOT_ENDED:
            since = None
            return False
        if since is None:
            since = time.monotonic()
        return not writer_may_be_alive(jd) or time.monotonic() - since >= grace_s
    return check


def follow_events(jd: JobDir, as_json: bool, poll_s: float = 0.5,
                  done: Callable[[], bool] | None = None) -> None:
    """Print the job's events, then new ones as they are written, until the job ends (or Ctrl-C)."""
    offset = 0
    buf = b""
    ended = done or job_over(jd)
    while True:
        finished = ended()   # asked first: lines written before it ended are still read below
        try:
            with open(jd.events, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        buf += chunk
        *whole, buf = buf.split(b"\n")
        for line in whole:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            print(json.dumps(ev) if as_json else format_event(ev), flush=True)
        if finished:
            return
        try:
            time.sleep(poll_s)
        except KeyboardInterrupt:
            sys.stdout.flush()
            return
