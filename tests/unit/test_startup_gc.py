"""The rank entry's start-up without the cyclic collector: off while run as the rank entry, back on after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Fresh interpreters: the collector's state is per process.
AFTER = """
import gc
from fleetmpi.engine.trainer import gc_after_startup
gc.disable()
gc_after_startup()
print(gc.isenabled(), gc.get_freeze_count() > 0, end=" ")
gc.unfreeze()
gc_after_startup()                      # the collector on: nothing to do, nothing frozen
print(gc.isenabled(), gc.get_freeze_count())
"""

# Run as __main__ (python -m fleetmpi.engine.worker) the worker turns the collector off before
# its imports; imported, it leaves it alone. The entry's last line (the phase, then the process
# exit) is left out here, so that the state can be read.
ENTRY = """
import gc
import fleetmpi.engine.worker as imported
print(gc.isenabled(), end=" ")
src = open(imported.__file__).read()
assert src.count("exit_now(main())") == 1
exec(compile(src.replace("exit_now(main())", "pass"), imported.__file__, "exec"), {"__name__": "__main__"})
print(gc.isenabled())
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_gc_after_startup_turns_the_collector_on_only_where_it_was_off() -> None:
    assert _run(AFTER) == "True True True 0"


def test_the_rank_entry_runs_its_imports_without_the_collector() -> None:
    assert _run(ENTRY) == "True False"
