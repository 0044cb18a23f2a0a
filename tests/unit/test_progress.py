"""Issue 16.5, watching a run: what the progress bar and the progress lines show."""

from __future__ import annotations

import io
import re
from pathlib import Path

from conftest import write_spec

from fleetmpi.engine.monitor import Monitor
from fleetmpi.engine.technique import StepRecord
from fleetmpi.jobdir import JobDir
from fleetmpi.spec import load


def _monitor(tmp_path: Path, progress: str, stream: io.StringIO) -> Monitor:
    data = tmp_path / "data"
    spec = load(write_spec(tmp_path / "s.yaml", data, monitor={"log_every_steps": 1, "eval_every_steps": 5,
                                                                "line_every_s": 1e-6}))
    jd = JobDir(tmp_path / "job")
    jd.root.mkdir()
    return Monitor(jd, spec, "one", 2, 1000, {}, 0.0, progress, stream=stream)


def _rec(compute_s: float) -> StepRecord:
    return StepRecord(loss=0.5, lr=0.1, samples=50, batch_fp=0.0, cursor=0, compute_s=compute_s, comm_s=0.0,
                      payload_bytes=400, wire_bytes=400.0, signal=0.0)


def test_the_first_progress_line_does_not_count_a_first_step_that_compiled(tmp_path: Path) -> None:
    out = io.StringIO()
    mon = _monitor(tmp_path, "lines", out)
    mon.step(_rec(compute_s=8.0), step=1, epoch=0.05, optimizer="sgd")   # 8 s: numba compiling
    mon.step(_rec(compute_s=0.001), step=2, epoch=0.1, optimizer="sgd")
    lines = out.getvalue().splitlines()
    rate = float(re.search(r" (\d+) samples/s", lines[0]).group(1))  # type: ignore[union-attr]
    assert rate > 100, lines   # 50 rows over 8 s would say 6 samples/s
    assert "sync 400 B/step" in lines[0], lines
    mon.end("fleetmpi: done")


def test_the_bar_shows_the_newest_valid_metrics_and_closes_before_the_final_line(tmp_path: Path) -> None:
    out = io.StringIO()
    mon = _monitor(tmp_path, "bar", out)
    for s in range(1, 6):
        mon.step(_rec(compute_s=0.001), step=s, epoch=s / 20, optimizer="sgd")
    mon.evaluated({"valid_loss": 0.4321, "valid_accuracy": 0.875}, {})
    mon.step(_rec(compute_s=0.001), step=6, epoch=0.3, optimizer="sgd")
    mon._bar.refresh()
    text = out.getvalue()
    assert "valid_loss 0.4321 valid_accuracy 0.8750" in text, text
    line = "fleetmpi: target met: valid_loss 0.4321 < 0.5 at step 6"
    mon.end(line)
    # The bar's last frame comes first and the line stands alone below it (not drawn over by the bar).
    assert out.getvalue().endswith("\n" + line + "\n"), repr(out.getvalue()[-300:])
    assert mon._bar is None


def test_the_bar_redrawn_at_most_every_tenth_of_a_second_still_ends_on_the_last_step(tmp_path: Path) -> None:
    # Steps come far faster than the bar is redrawn (the monitor skips the bar between redraws):
    # closing it must still draw the last step's epoch and loss, not the last redraw's.
    out = io.StringIO()
    mon = _monitor(tmp_path, "bar", out)
    for s in range(1, 400):
        mon.step(_rec(compute_s=0.001), step=s, epoch=s / 1000, optimizer="sgd")
    mon.step(_rec(compute_s=0.001)._replace(loss=0.1234), step=400, epoch=0.4321, optimizer="sgd")
    mon.evaluated({"valid_loss": 0.25}, {})   # the goal's evaluation, which opens a new window
    mon.end("fleetmpi: done")
    frames = out.getvalue().removesuffix("fleetmpi: done\n").split("\r")
    assert "0.43/" in frames[-1] and "loss 0.1234" in frames[-1], repr(frames[-1])
    # The sync bytes of the steps before the evaluation, not of the empty window after it.
    assert "sync 400 B/step" in frames[-1], repr(frames[-1])
    assert mon.last["step"] == 400 and mon.last["loss"] == 0.1234
