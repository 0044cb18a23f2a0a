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


def test_fresh_install_step_removes_only_numba_cache_files(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # numba checks a cached function against its own file only: the install step reruns on
    # any kernel change and must drop every cached kernel, in the packages' __pycache__ and
    # where NUMBA_CACHE_DIR puts them (numba's own locator names that folder), keeping
    # bytecode, sources and other packages' caches.
    from pathlib import Path

    from numba.core import caching

    from fleetmpi.engine.precompile import clear_numba_cache
    root = Path(str(tmp_path)) / "repo"
    user = Path(str(tmp_path)) / "numba-cache"
    monkeypatch.setattr(caching.config, "CACHE_DIR", str(user))
    for rel in ("kernels", "fleetmpi/engine", "other"):
        (root / rel).mkdir(parents=True)
        (root / rel / "mod.py").write_text("# source\n")
    made = []
    dirs = [root / rel / "__pycache__" for rel in ("kernels", "fleetmpi/engine", "other")]
    dirs += [Path(caching.UserProvidedCacheLocator.get_suitable_cache_subpath(str(root / rel / "mod.py")))
             for rel in ("kernels", "other")]
    for d in dirs:
        d = d if d.is_absolute() else user / d
        d.mkdir(parents=True, exist_ok=True)
        for name in ("mod.f-1.py311.nbi", "mod.f-1.py311.1.nbc", "mod.cpython-311.pyc"):
            (d / name).write_bytes(b"x")
            made.append(d / name)
    assert clear_numba_cache(root) == 6
    gone = {p for p in made if not p.exists()}
    assert gone == {p for p in made if p.suffix in (".nbi", ".nbc") and "other" not in p.parts
                    and not p.parent.name.startswith("other_")}
    assert (root / "kernels" / "mod.py").exists()
