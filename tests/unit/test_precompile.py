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


def test_fresh_install_step_removes_only_numba_cache_files(tmp_path: object) -> None:
    # numba checks a cached function against its own file only: the install step reruns on
    # any kernel change and must drop every cached kernel, keeping bytecode and sources.
    from pathlib import Path

    from fleetmpi.engine.precompile import clear_numba_cache
    root = Path(str(tmp_path))
    made = []
    for rel in ("kernels/__pycache__", "fleetmpi/engine/__pycache__", "other/__pycache__"):
        d = root / rel
        d.mkdir(parents=True)
        for name in ("cpu_glm._glm_grad-1.py311.nbi", "cpu_glm._glm_grad-1.py311.1.nbc", "cpu_glm.cpython-311.pyc"):
            (d / name).write_bytes(b"x")
            made.append(d / name)
    (root / "kernels" / "cpu_glm.py").write_text("# source\n")
    assert clear_numba_cache(root) == 4
    left = {p.relative_to(root).as_posix() for p in made if p.exists()}
    assert left == {"kernels/__pycache__/cpu_glm.cpython-311.pyc", "fleetmpi/engine/__pycache__/cpu_glm.cpython-311.pyc",
                    "other/__pycache__/cpu_glm._glm_grad-1.py311.nbi", "other/__pycache__/cpu_glm._glm_grad-1.py311.1.nbc",
                    "other/__pycache__/cpu_glm.cpython-311.pyc"}
    assert (root / "kernels" / "cpu_glm.py").exists()
