"""The install step's warm-ups run: `make install` calls them (fleetmpi.engine.precompile)."""

from __future__ import annotations

import pytest

from fleetmpi.engine.precompile import steps


@pytest.mark.parametrize("name,warm", steps(), ids=[name for name, _ in steps()])
def test_every_warm_up_of_the_install_step_runs(name: str, warm: object) -> None:
    assert callable(warm)
    warm()   # raises on a kernel whose signature drifted from its warm-up (as trees' did)
