"""A rank's error line reaches the user even when mpiexec does not pass it on.

A rank that fails alone prints its line and calls MPI_Abort; hydra can end before it has
forwarded the rank's last output. CI saw it once, under load: ``fleetmpi run`` exited 1 and
said nothing of why (tests/mpi/test_engine.py's injected fault). The rank also records the
line as an ``error`` event, and the launcher now says any such line its output lacks.

The stand-in for mpiexec below records the event as a rank would and exits 1, printing the
line or not.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from fleetmpi.jobdir import JobDir
from fleetmpi.launch.local import LocalBackend
from fleetmpi.spec import from_raw

LINE = "fleetmpi: rank 1/2@node7: RuntimeError: injected fault at step 7"


def _fake_mpiexec(tmp_path: Path, prints: bool) -> Path:
    # Called as `mpiexec -n N python -m fleetmpi.engine.worker JOB_DIR`.
    script = tmp_path / "mpiexec"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time, pathlib\n"
        "events = pathlib.Path(sys.argv[-1]) / 'events.jsonl'\n"
        f"line = {LINE!r}\n"
        "with open(events, 'a') as f:\n"
        "    f.write(json.dumps({'t': time.time(), 'event': 'error', 'message': line}) + '\\n')\n"
        "print('[a x2] step 2 loss 1.0', flush=True)\n"
        f"if {prints!r}:\n"
        "    print(line, file=sys.stderr, flush=True)\n"
        "sys.exit(1)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prints: bool) -> tuple[int, str, JobDir]:
    monkeypatch.setenv("FLEETMPI_MPIEXEC", str(_fake_mpiexec(tmp_path, prints)))
    monkeypatch.setenv("FLEETMPI_PRESTART", "off")
    spec = from_raw({"name": "t", "data": {"train": "x.h5"}, "model": {"kind": "softmax"}, "goal": {"max_steps": 9},
                     "fleet": {"start": "a", "phases": {"a": {"ranks_per_node": 1}}}}, "spec.yaml", Path("."))
    jd = JobDir(tmp_path / "job")
    jd.create("name: t\n", "a", "local")
    out = io.StringIO()
    rc = LocalBackend(jd, spec, out=out).run()
    return rc, out.getvalue(), jd


@pytest.mark.parametrize("prints", [False, True])
def test_the_error_line_is_said_once_whether_or_not_mpiexec_passed_it_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prints: bool) -> None:
    rc, out, jd = _run(tmp_path, monkeypatch, prints)
    assert rc == 1
    assert out.count(LINE) == 1, out
    assert "step 2 loss" in out
    log = Path(next(e["log"] for e in jd.read_events() if e["event"] == "launch"))
    assert log.read_text().count(LINE) == 1          # the log holds it too, once
    assert jd.read_state()["status"] == "FAILED"
    assert os.path.exists(jd.events)
    assert [json.loads(x)["event"] for x in jd.events.read_text().splitlines()].count("error") == 1
