"""The Slurm test tier's fixture: a real minicluster (jobscripts/minicluster), started on demand.

Import ``slurm_cluster`` into a test module. Where the cluster is not running it is brought
up with ``up.sh`` (which installs slurm-wlm when missing) and taken down after the session;
a cluster that was already up is left as it was. Where it cannot start the tests skip,
except with ``CI=true``: then they fail, so CI never passes without having run them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "jobscripts" / "minicluster"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(why: str) -> None:
    if _ci():
        pytest.fail(f"CI=true and the Slurm minicluster cannot run: {why}", pytrace=False)
    pytest.skip(f"Slurm minicluster unavailable: {why}")


def _up(conf: Path) -> bool:
    if not conf.is_file():
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)},
                             capture_output=True, text=True, timeout=15)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out.stdout


def _busy(conf: Path) -> bool:
    """Return whether jobs (of another session sharing the cluster) are queued or running."""
    out = subprocess.run(["squeue", "--noheader", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING", "--format=%i"],
                         env={**os.environ, "SLURM_CONF": str(conf)}, capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and bool(out.stdout.strip())


def wait_idle(timeout_s: float = 60.0) -> None:
    """Wait until no job of the cluster is pending or running (tests share its four nodes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "--noheader", "--states=PENDING,RUNNING,CONFIGURING,COMPLETING",
                              "--format=%i"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"cluster still busy after {timeout_s} s: {out.stdout.split()}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """Yield the running minicluster's state dir, with SLURM_CONF set for every subprocess."""
    state_dir = Path(os.environ.get("FLEETMPI_CLUSTER_DIR", "/tmp/fleetmpi-minicluster"))
    conf = state_dir / "etc" / "slurm.conf"
    started = False
    if not _up(conf):
        if os.geteuid() != 0:
            _unavailable("it is not running and up.sh must run as root")
        try:
            proc = subprocess.run(["bash", str(CLUSTER / "up.sh")], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            _unavailable("up.sh did not finish within 900 s")
        if proc.returncode != 0:
            _unavailable(f"up.sh exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        started = True
        if not _up(conf):
            _unavailable("up.sh succeeded but `scontrol ping` does not answer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        mp.setenv("FLEETMPI_CLUSTER_DIR", str(state_dir))
        wait_idle()
        yield state_dir
    if started and os.environ.get("FLEETMPI_KEEP_CLUSTER") != "1" and not _busy(conf):
        subprocess.run(["bash", str(CLUSTER / "down.sh")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FLEETMPI_CLUSTER_DIR": str(state_dir)})
