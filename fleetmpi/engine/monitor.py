"""Rank-0 monitor: step metrics, rule metrics, metrics.jsonl, and what a person sees.

Per step it gets what the worker measured; at evaluation points it folds in validation
results and the ranks' utilisation and returns the metric mapping rules are judged on.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fleetmpi.engine.technique import StepRecord
from fleetmpi.jobdir import JobDir, json_line
from fleetmpi.rules import format_bytes
from fleetmpi.spec import Spec


class Monitor:
    """Accumulate metrics of one phase on rank 0 (totals carry over from the checkpoint)."""

    def __init__(self, jd: JobDir, spec: Spec, phase: str, ranks: int, n_train: int,
                 carried: dict[str, Any], job_start: float, progress: str,
                 stream: TextIO = sys.stderr, idle_nodes: Callable[[], dict[str, float]] | None = None,
                 start_step: int = 0, start_epoch: float = 0.0) -> None:
        """Start the phase's metrics; ``idle_nodes`` returns the scheduler's idle_nodes metrics (None: none)."""
        self.jd, self.spec, self.phase, self.ranks, self.n = jd, spec, phase, ranks, n_train
        self.sync_total = int(carried.get("sync_bytes_total", 0))
        self.wire_total = float(carried.get("wire_bytes_total", 0.0))
        self.best_loss = float(carried.get("best_loss", math.inf))
        self.best_step = int(carried.get("best_step", 0))
        self.ema: float | None = carried.get("loss_ema")
        # Early stopping and keep_best: the best valid_loss so far, its step and metrics, and
        # the evaluations since (carried in checkpoints, so they survive rescales and resumes).
        bv = carried.get("best_valid_loss")
        self.best_valid_loss = float(bv) if isinstance(bv, (int, float)) else math.inf
        self.best_valid_step: int | None = carried.get("best_valid_step")
        self.best_valid: dict[str, float] = dict(carried.get("best_valid", {}))
        self.evals_since_best = int(carried.get("evals_since_best", 0))
        self.job_start = job_start
        self.phase_start = time.time()
        self.phase_start_step: int | None = None
        self.start_step, self.start_epoch = start_step, start_epoch   # where the phase begins (before a step)
        # The newest step's (step, epoch, loss, lr, optimizer, cursor, batch_fp, t): a tuple a
        # step, made a dict (``last``) only when a record, line or metric needs it.
        self._last: tuple[Any, ...] | None = None
        self._log_every = spec.monitor.log_every_steps
        self._plateau_below = 1.0 - spec.monitor.plateau_rel_tol
        self.valid: dict[str, float] = {}
        self.util: dict[str, float] = {}
        self._win = _Window()
        self._shown_win = self._win   # the bar's sync bytes: the last window with steps in it
        self._log_win = _Window()
        self.stream = stream
        self.progress = progress
        self._bar: Any = None
        self._last_line = 0.0
        self._last_bar = 0.0
        self._metrics_fd: int | None = None
        self._idle = idle_nodes
        from fleetmpi.engine.trackers import Trackers
        self.trackers = Trackers(jd, spec, phase=phase, ranks=ranks, step=start_step, say=self.say)

    # -- per step -------------------------------------------------------------------------
    def step(self, rec: StepRecord, *, step: int, epoch: float, optimizer: str) -> None:
        """Record one finished step (``step`` counts steps done, so it starts at 1)."""
        now = time.time()
        # A phase's first step may compile kernels (numba, lazily) and touch cold data: it counts
        # for bytes per step but not for throughput, which is timed from its end.
        timed = self.phase_start_step is not None
        if self.phase_start_step is None:
            self.phase_start_step = step - 1
        self.sync_total += rec.payload_bytes
        self.wire_total += rec.wire_bytes
        loss = rec.loss
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        if self.ema < self.best_loss * self._plateau_below:
            self.best_loss, self.best_step = self.ema, step
        self._win.add(now, rec, timed)
        self._log_win.add(now, rec, timed)
        self._last = (step, epoch, loss, rec.lr, optimizer, rec.cursor, rec.batch_fp, now)
        if step % self._log_every == 0:
            self._write(self._record(self._log_win))
            self._log_win = _Window()
        if self.progress != "none":
            self._show(now)

    @property
    def last(self) -> dict[str, Any]:
        """The newest step: step, epoch, loss, lr, optimizer, cursor, batch_fp, t ({} before the first)."""
        if self._last is None:
            return {}
        return dict(zip(_LAST_FIELDS, self._last))

    def _record(self, win: _Window, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        rec = {**self.last, "phase": self.phase, "ranks": self.ranks,
               "loss_ema": self.ema, **win.rates(),
               "sync_bytes_total": self.sync_total, "wire_bytes_total": self.wire_total}
        rec.update(extra or {})
        return rec

    def _write(self, rec: dict[str, Any], track: dict[str, Any] | None = None) -> None:
        """Append ``rec`` to metrics.jsonl and send ``track`` (default: ``rec``) to the trackers."""
        # metrics.jsonl stays open for the phase (opened on the first record, through the job
        # dir's link checks): one write a record, where opening and closing it each time
        # cost 12 us of a record's 22 (a record every log_every_steps, 10 by default).
        if self._metrics_fd is None:
            self._metrics_fd = self.jd.open_append(self.jd.metrics)
        os.write(self._metrics_fd, json_line(rec))
        if self.trackers.enabled:
            self.trackers.scalars(int(rec.get("step", 0)), rec if track is None else track)
            self._keep_tracker_state()

    def _keep_tracker_state(self) -> None:
        """Write what the trackers keep (the MLflow run id) into state.json, from this thread only."""
        kept = self.trackers.take_state()
        if kept:
            try:
                self.jd.update_state(**kept)
            except OSError as e:   # a full disk is the run's business (its next write says so), not the tracker's
                self.say(f"fleetmpi: warning: could not keep {', '.join(kept)} in state.json: {e}")

    # -- evaluation points ----------------------------------------------------------------
    def evaluated(self, valid: dict[str, float], util: dict[str, float]) -> dict[str, float]:
        """Fold in validation and utilisation; log them; return the rule metrics."""
        self.valid, self.util = valid, util
        metrics = self.metrics()
        # Trackers get the evaluation's own values: the step's were sent with its step record.
        self._write(self._record(self._win, {"eval": True, **valid, **util}), track={**valid, **util})
        self._shown_win, self._win = self._win, _Window()
        if self._bar is not None:
            self._update_bar()   # the bar shows the newest valid metrics at once, not at the next step
        return metrics

    def judge_valid(self, step: int, min_delta: float) -> bool:
        """Count this evaluation for early stopping; return whether valid_loss beat the best by > ``min_delta``."""
        loss = self.valid.get("valid_loss")
        if loss is not None and math.isfinite(loss) and loss < self.best_valid_loss - min_delta:
            self.best_valid_loss, self.best_valid_step = float(loss), step
            self.best_valid = dict(self.valid)
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    def metrics(self) -> dict[str, float]:
        """Return the metric mapping rules and goals are judged on."""
        now = time.time()
        rates = self._win.rates()
        step = int(self.last.get("step", self.start_step))
        m: dict[str, float] = {
            "step": step, "epoch": float(self.last.get("epoch", self.start_epoch)),
            "loss": float(self.ema if self.ema is not None else math.nan),
            "loss_plateau_steps": step - self.best_step,
            "sync_bytes_total": self.sync_total,
            "sync_bytes_per_step": rates["sync_bytes_per_step"],
            "wire_bytes_per_step": rates["wire_bytes_per_step"],
            "sync_bytes_per_s": rates["sync_bytes_per_s"],
            "samples_per_s": rates["samples_per_s"],
            "comm_fraction": rates["comm_fraction"],
            "elapsed_s": now - self.job_start,
            "phase_elapsed_s": now - self.phase_start,
            "phase_steps": step - (self.start_step if self.phase_start_step is None else self.phase_start_step),
            "ranks": self.ranks,
        }
        m.update(self.valid)
        m.update(self.util)
        if self._idle is not None:
            m.update(self._idle())
        return m

    def summary(self) -> dict[str, Any]:
        """Return the totals a checkpoint carries into the next phase."""
        return {"sync_bytes_total": self.sync_total, "wire_bytes_total": self.wire_total,
                "best_loss": self.best_loss, "best_step": self.best_step, "loss_ema": self.ema,
                "best_valid_loss": self.best_valid_loss if math.isfinite(self.best_valid_loss) else None,
                "best_valid_step": self.best_valid_step, "best_valid": self.best_valid,
                "evals_since_best": self.evals_since_best,
                **{k: v for k, v in self.valid.items()}}

    # -- display ----------------------------------------------------------------------------
    def _show(self, now: float) -> None:
        # The bar is redrawn at most every _BAR_EVERY_S (tqdm's own default refresh), not every
        # step: each update formats its postfix and cost ~2.5 us a step, 8% of a 30 us step.
        if self.progress == "bar":
            if now - self._last_bar >= _BAR_EVERY_S:
                self._last_bar = now
                self._update_bar()
        elif (self.progress == "lines" and self._win.timed
              and now - self._last_line >= self.spec.monitor.line_every_s):
            self._last_line = now
            self.say(self.status_line())

    def status_line(self) -> str:
        m, last = self._win.rates(), self.last
        valid = self._valid_text()
        return (f"[{self.phase} x{self.ranks}] step {last.get('step', 0)} epoch {last.get('epoch', 0):.3f} "
                f"loss {last.get('loss', math.nan):.4f}{valid} sync {format_bytes(m['sync_bytes_per_step'])}/step "
                f"{format_bytes(m['sync_bytes_per_s'])}/s {m['samples_per_s']:.0f} samples/s "
                f"comm {100 * m['comm_fraction']:.0f}%")

    def _update_bar(self) -> None:
        if self._bar is None:
            from tqdm import tqdm
            goal = self.spec.goal
            total = goal.max_epochs if goal.max_epochs is not None else None
            self._bar = tqdm(total=total, initial=float(self.last.get("epoch", 0.0)), unit="epoch",
                             file=self.stream, dynamic_ncols=True, desc=f"{self.phase} x{self.ranks}",
                             bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} ep [{elapsed}<{remaining}{postfix}]")
        epoch = float(self.last.get("epoch", 0.0))
        self._bar.update(epoch - self._bar.n)
        if self._win.steps:
            self._shown_win = self._win
        m = self._shown_win.rates()
        self._bar.set_postfix_str(f"loss {self.last.get('loss', math.nan):.4f}{self._valid_text()} "
                                  f"sync {format_bytes(m['sync_bytes_per_step'])}/step", refresh=False)

    def _valid_text(self) -> str:
        """Return " valid_loss X valid_accuracy Y" for the newest evaluation ("" before the first)."""
        return "".join(f" {k} {self.valid[k]:.4f}" for k in ("valid_loss", "valid_accuracy") if k in self.valid)

    def say(self, line: str) -> None:
        """Print one line for a person (above the bar when there is one)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _close_metrics(self) -> None:
        """Close metrics.jsonl (a later record opens it again)."""
        if self._metrics_fd is not None:
            fd, self._metrics_fd = self._metrics_fd, None
            os.close(fd)

    def close(self) -> None:
        """Close the progress bar (its last state stays on the terminal)."""
        if self._bar is not None:
            self._update_bar()   # the steps since the last redraw
            self._bar.close()
            self._bar = None

    def end(self, line: str, *, rescale: str | None = None, outcome: dict[str, Any] | None = None,
            model: Path | None = None) -> None:
        """End the phase for a person and the trackers: close the bar, then print ``line`` below it.

        ``rescale`` describes a rescale ("small x2 -> wide x3 at step 20"); ``outcome`` is how the run
        ended (monitor.outcome's dict) and ``model`` the model file the trackers keep.
        """
        self.close()
        self._close_metrics()
        self.say(line)
        step = int(self.last.get("step", 0))
        if rescale is not None:
            self.trackers.note("rescale", rescale, step)
        if outcome is not None:
            self.trackers.finish({**outcome, "step": step}, model)
        self.trackers.close()
        self._keep_tracker_state()


_LAST_FIELDS = ("step", "epoch", "loss", "lr", "optimizer", "cursor", "batch_fp", "t")
_BAR_EVERY_S = 0.1

FINAL_METRICS = ("step", "epoch", "loss", "valid_loss", "valid_accuracy")
TARGETS = (("loss_below", "loss", "<"), ("valid_loss_below", "valid_loss", "<"),
           ("valid_accuracy_above", "valid_accuracy", ">"))


def finite_or_none(value: Any) -> Any:
    """Return ``value`` with every non-finite float replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def outcome(goal: Any, *, ended_by: str, hit: list[str], metrics: dict[str, Any], step: int,
            budget: str, best_step: int | None, best: dict[str, Any], model_step: int,
            model_name: str = "model.h5", stop: str = "") -> dict[str, Any]:
    """Return how a run ended: target_met, outcome, reason line, final and best metrics, model step.

    ``ended_by`` is "target", "budget", "patience", "solved" (a closed-form fit) or "stop rule"; ``hit`` names the targets
    met; ``budget`` describes the budget ("max_epochs 60"); ``best`` holds the metrics at
    ``best_step`` (best valid_loss), ``model_step`` the step whose parameters model.h5 holds.
    The same dict goes into the goal event and state.json; every CLI, API and notification
    reads these names. Non-finite metrics become None.
    """
    final = {k: metrics[k] for k in FINAL_METRICS if k in metrics}
    targets = [(name, metric, op, getattr(goal, name)) for name, metric, op in TARGETS
               if getattr(goal, name) is not None]
    target_met: bool | None = bool(hit) if targets else None
    if hit:
        said = "; ".join(f"{metric} {_num(metrics.get(metric))} {op} {_num(value)}"
                         for name, metric, op, value in targets if name in hit)
        line = f"target met: {said} at step {step}"
        kind = "target met"
    else:
        kind = {"budget": "budget spent", "patience": "stopped early", "stop rule": "stop rule",
                "solved": "solved"}[ended_by]
        why = {"budget": f"budget spent ({budget})", "solved": f"fit solved at step {step}",
               "patience": (f"stopped early (valid_loss not better by more than {_num(goal.min_delta)} in "
                            f"{goal.patience} evaluations) at step {step}"),
               "stop rule": f"{stop or 'a stop rule'} fired at step {step}"}[ended_by]
        wanted = " or ".join(f"{metric} {op} {_num(value)}" for _, metric, op, value in targets)
        line = why + (f" before {wanted}" if wanted else "")
        if best_step is not None and "valid_loss" in best:
            line += f"; best valid_loss {_num(best['valid_loss'])} at step {best_step}"
        line += (f", written to {model_name}" if model_step == best_step
                 else f"; model from step {model_step} written to {model_name}")
    return finite_or_none({"target_met": target_met, "outcome": kind, "reason": line, "metrics": final,
                           "best_step": best_step, "best_metrics": best or None, "model_step": model_step,
                           "targets_hit": hit})


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4g}"


class _Window:
    """Sums over the steps since the window opened, turned into rates on demand."""

    __slots__ = ("comm", "compute", "payload", "samples", "steps", "t0", "t1", "timed", "timed_payload", "wire")

    def __init__(self) -> None:
        self.t0: float | None = None
        self.t1 = 0.0
        self.steps = self.timed = self.samples = self.payload = self.timed_payload = 0
        self.wire = self.compute = self.comm = 0.0

    def add(self, now: float, rec: StepRecord, timed: bool = True) -> None:
        """Add a step; an untimed one (a phase's first) counts for bytes per step only and opens the clock."""
        payload, wire, compute, comm = rec.payload_bytes, rec.wire_bytes, rec.compute_s, rec.comm_s
        if not timed:
            self.t0 = self.t0 if self.t0 is not None else now
            self.t1 = now
            self.steps += 1
            self.payload += payload
            self.wire += wire
            return
        if self.t0 is None:
            # The window's first step started before ``now``: count its own duration.
            self.t0 = now - (compute + comm)
        self.t1 = now
        self.steps += 1
        self.timed += 1
        self.timed_payload += payload
        self.samples += rec.samples
        self.payload += payload
        self.wire += wire
        self.compute += compute
        self.comm += comm

    def rates(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        dt = max(self.t1 - (self.t0 or self.t1), 1e-9)
        busy = self.compute + self.comm
        return {"samples_per_s": self.samples / dt if self.timed else 0.0,
                "sync_bytes_per_step": self.payload / steps,
                "wire_bytes_per_step": self.wire / steps,
                "sync_bytes_per_s": self.timed_payload / dt if self.timed else 0.0,
                "compute_s": self.compute, "comm_s": self.comm,
                "comm_fraction": self.comm / busy if busy > 0 else 0.0}
