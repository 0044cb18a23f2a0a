"""The Slurm batch side's share of one-writer-per-job-dir: `begin` locks the batch shell's
open lock file (so the shell holds it for the allocation), `continue` releases it, and a
job dir someone else holds is left untouched. Runs the real batch entry point; no cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import write_spec

from fleetmpi import spec as specmod
from fleetmpi.jobdir import JobDir
from fleetmpi.launch.slurm import batch
from fleetmpi.launch.slurm.chain import record
from fleetmpi.lock import LOCK_FD_ENV, JobDirBusy, JobLock


@pytest.fixture
def job(tmp_path: Path, datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> JobDir:
    path = write_spec(tmp_path / "s.yaml", datasets["multiclass"])
    sp = specmod.load(path)
    jd = JobDir(tmp_path / "job")
    jd.create(specmod.dump(sp), sp.fleet.start, "slurm")
    (jd.root / "slurm").mkdir()   # made by the submission that queued this allocation,
    # which also recorded the job in the chain before releasing it (a job no run of the
    # chain, as one withdrawn after a submission ahead, writes nothing)
    record(jd, "submit", index=0, job_id="4242", restart=0, phase=sp.fleet.start, shape="1x1", key="k.0", by="submit")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(batch, "LOCK_WAIT_S", 0.3)
    return jd


def _shell_fd(jd: JobDir) -> int:
    """Open the lock file as the batch script's `exec 9>>lock` does."""
    return os.open(jd.root / "lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _step(monkeypatch: pytest.MonkeyPatch, shell_fd: int, *argv: str) -> int:
    """Run one batch step as a child of the shell would: with its own copy of the shell's open lock file."""
    monkeypatch.setenv(LOCK_FD_ENV, str(os.dup(shell_fd)))   # a dup shares the open file, as fork does
    # The continue step ignores SIGTERM and SIGUSR2; conftest's autouse fixture restores them.
    return batch.main(list(argv))


def test_begin_leaves_the_lock_held_by_the_shell_and_continue_releases_it(job: JobDir,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fd = _shell_fd(job)
    try:
        assert _step(monkeypatch, fd, "begin", str(job.root), "--phase", "one") == 0
        with pytest.raises(JobDirBusy, match="slurm job 4242"):   # held through the shell's open file
            JobLock(job, "fleetmpi run").acquire()
        # `continue` (the shell exec'd) ends the chain here: the phase exited 0 without its goal.
        monkeypatch.setattr(batch, "_lost_state", lambda job_id: None)
        assert _step(monkeypatch, fd, "continue", str(job.root), "--phase", "one", "--exit-code", "0") == 1
        with JobLock(job, "fleetmpi run"):
            pass
    finally:
        os.close(fd)


def test_begin_writes_nothing_to_a_job_dir_someone_else_holds(job: JobDir, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    fd = _shell_fd(job)
    events = job.events.read_bytes()
    slurm_dir = {p.name: p.read_bytes() for p in (job.root / "slurm").iterdir()}   # the chain's submit record
    try:
        with JobLock(job, "fleetmpi run"):
            assert _step(monkeypatch, fd, "begin", str(job.root), "--phase", "one") == 2
            assert _step(monkeypatch, fd, "continue", str(job.root), "--phase", "one", "--exit-code", "2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("in use by pid" in line and "fleetmpi run" in line for line in err), err
        assert job.events.read_bytes() == events
        assert {p.name: p.read_bytes() for p in (job.root / "slurm").iterdir()} == slurm_dir
    finally:
        os.close(fd)
