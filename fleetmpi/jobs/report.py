"""`fleetmpi report`: loss, sync bytes per step and fleet size over steps, as a PNG.

Drawn from the job dir's metrics.jsonl with matplotlib's Agg canvas (no pyplot, no
display, nothing global changed). Phase boundaries are dashed vertical lines labelled with
the phase that starts there, at the steps events.jsonl records the rescales at (metrics are
logged every monitor.log_every_steps, so the first record of a new phase may come later).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput
from fleetmpi.jobdir import JobDir

PANELS = ("loss", "sync bytes / step", "ranks")


def series(jd: JobDir) -> dict[str, Any]:
    """Return the step-ordered series a report plots (a step re-run after a resume counts once)."""
    by_step: dict[int, dict[str, Any]] = {}
    valid: dict[int, float] = {}
    for rec in jd.read_metrics():
        if "step" not in rec:
            continue
        step = int(rec["step"])
        if rec.get("eval"):
            if rec.get("valid_loss") is not None:
                valid[step] = float(rec["valid_loss"])
            continue
        by_step[step] = rec  # the newest record of a step wins (a retry re-runs steps)
    if not by_step:
        raise BadInput(f"{jd.metrics}: no step metrics yet; the job has not trained (see `fleetmpi events {jd.root}`)")
    steps = sorted(by_step)
    recs = [by_step[s] for s in steps]
    bounds = rescale_steps(jd, steps[-1])
    if not bounds:   # a job dir without events (copied metrics only): where the logged phase changes
        bounds = [(s, r.get("phase", "?")) for s, r, prev in zip(steps[1:], recs[1:], recs)
                  if r.get("phase") != prev.get("phase")]
    return {"step": steps, "loss": [float(r.get("loss", float("nan"))) for r in recs],
            "sync": [float(r.get("sync_bytes_per_step", 0.0)) for r in recs],
            "ranks": [int(r.get("ranks", 0)) for r in recs], "first_phase": recs[0].get("phase", "?"),
            "boundaries": bounds, "valid_step": sorted(valid), "valid_loss": [valid[s] for s in sorted(valid)]}


def rescale_steps(jd: JobDir, last_step: int) -> list[tuple[int, str]]:
    """Return (step, phase it went to) for each rescale in events.jsonl, in step order, up to ``last_step``.

    A rescale re-run after a retry (same step) counts once, the newest event winning.
    """
    by_step: dict[int, str] = {}
    for ev in jd.read_events():
        if ev.get("event") == "rescale" and isinstance(ev.get("step"), int) and ev["step"] <= last_step:
            by_step[int(ev["step"])] = str(ev.get("to", "?"))
    return sorted(by_step.items())


def require_matplotlib() -> None:
    """Raise BadInput saying how to install matplotlib where it is missing (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput("report: needs matplotlib, which is not installed; install it with "
                       "`pip install 'fleetmpi[plot]'` (or `pip install 'matplotlib>=3.8'`)") from None


def plot(jd: JobDir, title: str | None = None) -> Any:
    """Return a matplotlib Figure with one panel per entry of PANELS, sharing the step axis."""
    require_matplotlib()
    return _draw(series(jd), title or jd.root.name)


def _draw(s: dict[str, Any], title: str) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(9, 8), layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    ax_loss, ax_sync, ax_ranks = axes
    ax_loss.plot(s["step"], s["loss"], lw=1, label="train loss")
    if s["valid_step"]:
        ax_loss.plot(s["valid_step"], s["valid_loss"], "o", ms=3, label="valid loss")
    ax_loss.legend(loc="upper right")
    if min(s["loss"], default=0) > 0:
        ax_loss.set_yscale("log")
    ax_sync.plot(s["step"], s["sync"], lw=1, color="tab:orange")
    ax_ranks.step(s["step"], s["ranks"], where="post", color="tab:green")
    ax_ranks.set_ylim(0, max(s["ranks"]) + 1)
    ax_ranks.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, label in zip(axes, PANELS):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for step, _phase in s["boundaries"]:
            ax.axvline(step, ls="--", lw=1, color="gray")
    for step, phase in [(s["step"][0], s["first_phase"]), *s["boundaries"]]:
        ax_ranks.annotate(str(phase), (step, 0.05), xycoords=("data", "axes fraction"), fontsize=8,
                          xytext=(3, 0), textcoords="offset points")
    ax_ranks.set_xlabel("step")
    fig.suptitle(title)
    return fig


def write(jd: JobDir, out: Path | str, title: str | None = None) -> dict[str, Any]:
    """Write the report PNG atomically; return its path, size and panel count."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise BadInput(f"--out {out}: the report is a PNG; name it *.png")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: folder {out.parent} does not exist")
    require_matplotlib()
    s = series(jd)
    fig = _draw(s, title or jd.root.name)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "bytes": out.stat().st_size, "axes": len(fig.axes),
            "phases": 1 + len(s["boundaries"])}
