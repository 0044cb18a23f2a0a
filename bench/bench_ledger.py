"""Ledger at scale: `fleetmpi status` over 10,000 jobs, and one manager cycle over 1,000 active jobs.

Rows go in through the ledger API (add_job, claim, fold, transition). Baselines, measured
in the same run: a bare ``SELECT * FROM jobs`` for status, and the backend's own poll of
the same 1,000 allocations for the manager cycle. The cycle's allocations all point at one
live ``sleep`` process, so the local backend polls real pids without 1,000 processes.
Prints a table and writes bench/results/ledger.json; nothing is asserted.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import best_of, save, table

from fleetmpi.cli import main as cli_main
from fleetmpi.jobs.backends import LocalJobs
from fleetmpi.jobs.ledger import ACTIVE, COMPLETED, FAILED, Ledger
from fleetmpi.jobs.manager import Manager, ManagerConfig

N_STATUS = 10_000
N_ACTIVE = 1_000


def fill(ledger: Ledger, root: Path, n: int) -> list[int]:
    """Add ``n`` jobs (no job dirs are made); return their ids."""
    return [ledger.add_job(name=f"bench-{i % 97}", spec_path="bench.yaml", spec_hash="h", backend="local",
                           phase="one", shape="1x2", max_attempts=3, backoff_s=30.0, notify=[],
                           make_dir=lambda job_id: str(root / f"job-{job_id}")) for i in range(n)]


def status_bench(root: Path) -> list[dict]:
    os.environ["FLEETMPI_HOME"] = str(root)
    ledger = Ledger()
    t0 = time.perf_counter()
    ids = fill(ledger, root, N_STATUS)
    insert_s = time.perf_counter() - t0
    for k, job_id in enumerate(ids):  # a realistic mix: most jobs done, some running or failed
        if k % 10 == 0:
            continue  # NEW
        ledger.claim(job_id, "bench", now=time.time())
        ledger.fold(job_id, 0, 1, [{"t": time.time(), "event": "phase_start", "phase": "one", "shape": "1x2"}],
                    {"step": k, "epoch": k / 100, "loss": 1.0 / (k + 1), "sync_bytes_per_step": 4096.0})
        if k % 10 < 8:
            ledger.transition(job_id, COMPLETED if k % 10 < 7 else FAILED, expect=ACTIVE, reason="bench")

    def raw() -> None:
        ledger.conn.execute("SELECT * FROM jobs").fetchall()

    def status(*args: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["status", *args])

    base = best_of(raw, repeat=5)
    rows = [{"what": f"SELECT * FROM jobs ({N_STATUS} rows), baseline", "seconds": base, "ratio": 1.0}]
    for args in ((), ("--json",), ("--active",), (str(ids[N_STATUS // 2]),)):
        s = best_of(lambda: status(*args), repeat=3)
        rows.append({"what": f"fleetmpi status {' '.join(args)}".rstrip() + " (in process)", "seconds": s,
                     "ratio": s / base})
    env = {**os.environ, "FLEETMPI_HOME": str(root)}
    sub = best_of(lambda: subprocess.run([sys.executable, "-m", "fleetmpi.cli", "status"], env=env,
                                         stdout=subprocess.DEVNULL, check=True), repeat=3)
    rows.append({"what": "fleetmpi status (new process, as a user runs it)", "seconds": sub, "ratio": sub / base})
    rows.append({"what": f"add_job x {N_STATUS} (one transaction each)", "seconds": insert_s,
                 "ratio": insert_s / base})
    ledger.close()
    return rows


class CountingPoll:
    """A spy on the real LocalJobs backend that counts poll calls."""

    def __init__(self) -> None:
        self.real, self.name, self.calls = LocalJobs(), "local", 0

    def launch(self, job, attempt):  # type: ignore[no-untyped-def]
        return self.real.launch(job, attempt)

    def poll(self, allocations):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.real.poll(allocations)

    def cancel(self, allocation):  # type: ignore[no-untyped-def]
        self.real.cancel(allocation)


def cycle_bench(root: Path) -> list[dict]:
    import psutil
    ledger = Ledger(root / "ledger.db")
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        host = LocalJobs().host
        for job_id in fill(ledger, root, N_ACTIVE):
            ledger.claim(job_id, "bench", now=time.time())
            ledger.add_allocation(job_id, attempt=1, backend="local", backend_id=f"{host}:{sleeper.pid}#{job_id}",
                                  host=host, phase="one", shape="1x2", log=None,
                                  info={"pid": sleeper.pid, "start_time": started, "events_from": 0,
                                        "job_dir": str(root / f"job-{job_id}")})
        spy = CountingPoll()
        manager = Manager(ledger, ManagerConfig.resolve(max_running=N_ACTIVE), backends={"local": spy}, out=None)
        allocs = ledger.allocations(live=True)
        base = best_of(lambda: spy.real.poll(allocs), repeat=3)
        calls_before = spy.calls
        t0 = time.perf_counter()
        rep = manager.cycle()
        cycle_s = time.perf_counter() - t0
        calls = spy.calls - calls_before
        more = best_of(manager.cycle, repeat=3)
        return [{"what": f"LocalJobs.poll of {N_ACTIVE} allocations, baseline", "seconds": base, "ratio": 1.0},
                {"what": f"manager cycle, {N_ACTIVE} active jobs (first)", "seconds": cycle_s,
                 "ratio": cycle_s / base, "poll_calls": calls, "polled": rep.polled},
                {"what": f"manager cycle, {N_ACTIVE} active jobs (best of 3 more)", "seconds": more,
                 "ratio": more / base, "poll_calls": (spy.calls - calls_before - calls) // 3}]
    finally:
        sleeper.kill()
        sleeper.wait()
        ledger.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fleetmpi-bench-ledger-") as tmp:
        (Path(tmp) / "status").mkdir()
        (Path(tmp) / "cycle").mkdir()
        rows = status_bench(Path(tmp) / "status") + cycle_bench(Path(tmp) / "cycle")
    print(table("ledger: status over 10,000 jobs, manager cycle over 1,000 active jobs", rows,
                [("what", ""), ("seconds", ".4f"), ("ratio", ".1f"), ("poll_calls", "d"), ("polled", "d")]))
    save("ledger", rows, jobs_status=N_STATUS, jobs_active=N_ACTIVE)


if __name__ == "__main__":
    main()
