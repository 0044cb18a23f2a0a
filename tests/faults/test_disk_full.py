"""A full disk is an outcome with one line, not a traceback, and nothing already written is lost.

The job dir lives on a small tmpfs (mounted here; needs root, as CI runs), the data outside
it. A filler file leaves a little room, so the disk fills during training; a second case
starts with none, so it fills while the job dir is created. After the filler is removed,
`fleetmpi run JOB_DIR` (or the same `run` command) must carry on to the goal.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from campaign import Campaign, trials
from conftest import cli, write_spec

from fleetmpi.engine import checkpoint

pytestmark = pytest.mark.faults


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """Mount a 4 MiB tmpfs at tmp_path/disk for the test; unmount after."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the full-disk test (CI runs as root): {p.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """Write a filler file that leaves about ``leave`` bytes free on ``mnt``."""
    filler = mnt / "filler"
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def _one_line(p: subprocess.CompletedProcess[str]) -> bool:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("fleetmpi: phase ")
             and "rescale" not in ln]
    return (p.returncode == 1 and "Traceback" not in p.stderr and len(lines) == 1
            and "no space left on" in lines[0])


def test_disk_fills_during_training(disk: Path, tmp_path: Path, datasets: dict[str, Path],
                                    campaign: Campaign) -> None:
    for trial in range(trials(2, 6)):   # 1 and 2 ranks: rank 0 alone writes, the other must end alike
        ranks = 1 + trial % 2
        spec = write_spec(tmp_path / f"s{trial}.yaml", datasets["multiclass"], goal={"max_steps": 600},
                          checkpoint={"every_steps": 10, "keep": 2},
                          monitor={"log_every_steps": 1, "eval_every_steps": 5, "progress": "none"},
                          fleet={"start": "p", "phases": {"p": {"nodes": 1, "ranks_per_node": ranks}}})
        job = disk / f"job{trial}"
        filler = _fill(disk, 160_000 + 40_000 * (trial // 2))
        p = cli("run", str(spec), "--job-dir", str(job), timeout=300)
        good = [c for c in sorted((job / "ckpt").glob("step-*.h5")) if _loads(c)]
        ok = _one_line(p) and bool(good) and str(good[-1].name) in p.stderr
        filler.unlink()
        again = cli("run", str(job), timeout=300)
        ok = ok and again.returncode == 0 and (job / "model.h5").exists()
        campaign.record("disk full during training", ok)
        assert _one_line(p), (p.returncode, p.stderr[-3000:])
        assert good and good[-1].name in p.stderr, (p.stderr, list((job / "ckpt").iterdir()))
        assert again.returncode == 0, again.stderr[-3000:]
        for c in good:   # what was written before the disk filled is intact
            assert _loads(c) or not c.exists()


def test_disk_full_before_the_job_dir_exists(disk: Path, tmp_path: Path, datasets: dict[str, Path],
                                             campaign: Campaign) -> None:
    spec = write_spec(tmp_path / "s.yaml", datasets["multiclass"], goal={"max_steps": 20},
                      monitor={"log_every_steps": 1, "eval_every_steps": 5, "progress": "none"})
    filler = _fill(disk, 0)
    job = disk / "job"
    p = cli("run", str(spec), "--job-dir", str(job), timeout=300)
    filler.unlink()
    again = cli("run", str(spec), "--job-dir", str(job), timeout=300)
    campaign.record("disk full at job dir creation", _one_line(p) and again.returncode == 0)
    assert _one_line(p), (p.returncode, p.stderr[-3000:])
    assert again.returncode == 0, again.stderr[-3000:]


def _loads(path: Path) -> bool:
    try:
        checkpoint.load(path)
    except Exception:
        return False
    return True
