"""Faults of checkpoints (issue 11): kill -9 of the writer mid-write, byte flips and truncation.

A kill -9 of rank 0 while its checkpoint temp (`.step-*.h5.tmp.<pid>`) is open must leave
every earlier checkpoint valid; the next start removes the temp (a `temp_removed` event)
and resumes to the goal. A damaged newest checkpoint is set aside as `*.corrupt` with a
`checkpoint_skipped` event and the run resumes from the one before it, saying so.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest
from campaign import Campaign, trials
from conftest import cli, events, start_cli, write_spec

from fleetmpi.engine import checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _valid(path: Path) -> bool:
    try:
        checkpoint.load(path)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("trial", range(trials(ci=2, full=40)))
def test_kill9_during_a_checkpoint_write(tmp_path: Path, datasets: dict[str, Path], campaign: Campaign,
                                         trial: int) -> None:
    rng = random.Random(trial)
    # An MLP's checkpoint (about 35 KB, fsynced) takes a few ms to write; one every step keeps
    # rank 0 writing most of the time, so a temp is there to catch.
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], model={"kind": "mlp", "hidden": [256]},
                      goal={"max_steps": 400}, checkpoint={"every_steps": 1, "keep": 2},
                      monitor={"log_every_steps": 10, "eval_every_steps": 100},
                      fleet={"start": "p", "phases": {"p": {"nodes": 1, "ranks_per_node": 1 + trial % 2}}})
    job = tmp_path / "job"
    driver = start_cli("run", str(spec), "--job-dir", str(job))
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None and not (
            (job / "events.jsonl").exists() and any(e["event"] == "first_step" for e in events(job))):
        time.sleep(0.02)
    # At least one whole checkpoint first: the one the kill must leave intact (under load a kill
    # in the first write would leave nothing earlier to check).
    while time.time() < deadline and driver.poll() is None and not any((job / "ckpt").glob("step-*.h5")):
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    temp = None
    while temp is None and time.time() < deadline and driver.poll() is None:
        with os.scandir(job / "ckpt") as entries:
            for entry in entries:
                if entry.name.startswith(".step-") and ".h5.tmp." in entry.name:
                    try:
                        os.kill(int(entry.name.rsplit(".", 1)[1]), signal.SIGKILL)
                    except ProcessLookupError:   # renamed and its writer gone between scan and kill
                        continue
                    temp = Path(entry.path)
                    break
    _, err = driver.communicate(timeout=60)
    assert temp is not None, f"no checkpoint temp was seen (driver rc {driver.returncode}): {err[-2000:]}"
    earlier = sorted((job / "ckpt").glob("step-*.h5"))
    intact = all(_valid(p) for p in earlier)
    lost = sum(p.stat().st_size for p in earlier if not _valid(p))
    left = temp.exists()
    again = cli("run", str(job), timeout=300)
    removed = [e["path"] for e in events(job) if e["event"] == "temp_removed"]
    goal = [e for e in events(job) if e["event"] == "goal"]
    ok = (driver.returncode == 1 and intact and again.returncode == 0 and (not left or removed == [str(temp)])
          and not temp.exists() and bool(goal) and goal[-1]["step"] == 400)
    campaign.record("kill during checkpoint write", ok=ok, bytes_lost=lost)
    assert driver.returncode == 1, err
    assert earlier and intact, f"earlier checkpoints damaged: {[p.name for p in earlier if not _valid(p)]}"
    assert again.returncode == 0, again.stderr
    assert not temp.exists() and (not left or removed == [str(temp)]), (left, removed)
    assert goal and goal[-1]["step"] == 400


def _damage(path: Path, rng: random.Random, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
        return
    # Flip a byte of an array or of the metadata: bytes in HDF5's free space change nothing verified.
    with h5py.File(path, "r") as f:
        spans = [(f[name].id.get_offset(), f[name].id.get_storage_size()) for name in f["arrays"].keys()
                 for name in [f"arrays/{name}"] if f[name].id.get_offset() is not None]
    start, size = rng.choice(spans)
    at = start + rng.randrange(size)
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("trial", range(trials(ci=3, full=20)))
def test_corrupt_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(
        tmp_path: Path, datasets: dict[str, Path], campaign: Campaign, trial: int) -> None:
    rng = random.Random(trial)
    how = ("flip", "truncate")[trial % 2]
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 60},
                      checkpoint={"every_steps": 20, "keep": 3},
                      fleet={"start": "p", "phases": {"p": {"nodes": 1, "ranks_per_node": 1 + trial % 2}}})
    job = tmp_path / "job"
    cli("run", str(spec), "--job-dir", str(job), check=True, timeout=300)
    ckpts = sorted((job / "ckpt").glob("step-*.h5"))
    assert [p.name for p in ckpts] == ["step-00000020.h5", "step-00000040.h5", "step-00000060.h5"]
    newest, before = ckpts[-1], ckpts[-2]
    before_bytes = before.read_bytes()
    _damage(newest, rng, how)
    assert not _valid(newest)
    try:
        again = cli("run", str(job), "--set", "goal.max_steps=100", timeout=120)
        hang = False
    except subprocess.TimeoutExpired:
        campaign.record("corrupt checkpoint", ok=False, hang=True)
        raise
    skipped = [e for e in events(job) if e["event"] == "checkpoint_skipped"]
    resumed = [e for e in events(job) if e["event"] == "resume"]
    aside = Path(f"{newest}.corrupt")
    said = "resumed from step-00000040.h5" in again.stderr
    ok = (again.returncode == 0 and [e["path"] for e in skipped] == [str(newest)] and aside.exists()
          and bool(resumed) and resumed[-1]["step"] == 40 and said)
    campaign.record("corrupt checkpoint", ok=ok, hang=hang,
                    bytes_lost=0 if not before.exists() or before.read_bytes() == before_bytes else len(before_bytes))
    assert again.returncode == 0, again.stderr
    assert [e["path"] for e in skipped] == [str(newest)] and aside.exists(), skipped
    assert resumed and resumed[-1]["step"] == 40, resumed
    assert said, again.stderr
    assert [e for e in events(job) if e["event"] == "goal"][-1]["step"] == 100
