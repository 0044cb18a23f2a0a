"""Every spec shipped in examples/ validates (a broken example is a broken first impression)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetmpi import spec as specmod

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_loads_and_its_data_exists(path: Path) -> None:
    s = specmod.load(path)
    assert s.name and s.fleet.start in s.fleet.phases
    assert s.data_path(s.data.train).is_file()
    assert s.data.valid is None or s.data_path(s.data.valid).is_file()
