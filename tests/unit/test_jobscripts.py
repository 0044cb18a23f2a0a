"""jobscripts/ holds the sbatch templates README promises, never stale (issue 16, point 10)."""

from __future__ import annotations

import importlib.util
import subprocess

from conftest import ROOT

from fleetmpi import spec as specmod


def _render() -> dict[str, str]:
    loaded = importlib.util.spec_from_file_location("jobscripts_render", ROOT / "jobscripts" / "render.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module.render_all()   # type: ignore[no-any-return]


def test_committed_templates_equal_what_the_renderer_writes_now() -> None:
    files = _render()
    spec = specmod.load(ROOT / "examples" / "slurm.yaml")
    assert sorted(files) == sorted(f"{p}.sbatch" for p in spec.fleet.phases)
    committed = sorted(p.name for p in (ROOT / "jobscripts").glob("*.sbatch"))
    assert committed == sorted(files), "python jobscripts/render.py writes them"
    for name, text in files.items():
        assert (ROOT / "jobscripts" / name).read_text() == text, f"jobscripts/{name} is stale: python jobscripts/render.py"


def test_templates_mark_their_sources_and_passthrough_options() -> None:
    spec = specmod.load(ROOT / "examples" / "slurm.yaml")
    for phase in spec.fleet.phases:
        text = (ROOT / "jobscripts" / f"{phase}.sbatch").read_text()
        lines = text.splitlines()
        assert lines[0] == "#!/bin/bash"
        sbatch = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH ")]
        assert sbatch and all(lines[i - 1].startswith("# ") for i in sbatch)
        for option in spec.scheduler.extra_sbatch:
            i = lines.index(f"#SBATCH {option}")
            assert "PASSTHROUGH" in lines[i - 1]
        assert f"# from fleet.phases.{phase}.nodes" in text and f"--nodes={spec.phase(phase).nodes}" in text
        check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    readme = (ROOT / "jobscripts" / "README.md").read_text()
    assert all(f"{p}.sbatch" in readme for p in spec.fleet.phases)
