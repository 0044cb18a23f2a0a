"""The install step's warm-ups run: `make install` calls them (fleetmpi.engine.precompile)."""

from __future__ import annotations

import pytest

from fleetmpi.engine.precompile import steps


@pytest.mark.parametrize("name,warm", steps(), ids=[name for name, _ in steps()])
def test_every_warm_up_of_the_install_step_runs(name: str, warm: object) -> None:
    assert callable(warm)
    warm()   # raises on a kernel whose signature drifted from its warm-up (as trees' did)


def test_the_install_step_writes_bytecode_that_imports_use() -> None:
    # Under PYTHONDONTWRITEBYTECODE (set in this suite's environment or not) imports write no
    # .pyc: the install step must, and an import must then load it instead of the source.
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from fleetmpi.engine import precompile
    src = Path(precompile.__file__).resolve().parent / "worker.py"
    pyc = Path(importlib.util.cache_from_source(str(src)))
    pyc.unlink(missing_ok=True)
    dict(steps())["bytecode"]()
    assert pyc.is_file() and pyc.stat().st_size > 0
    out = subprocess.run([sys.executable, "-v", "-c", "import fleetmpi.engine.worker"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src.parents[2]), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"code object from '{pyc}'" in out.stderr
