"""fleetmpi.spec is split over modules (spec_fleet: the run side); every public name still imports from fleetmpi.spec.

Callers (launchers, CLI, jobscripts, tests) write ``from fleetmpi.spec import PhaseSpec`` or
``specmod.slurm_minutes``: a name added to a part but not re-exported would break them only
where it is used, so the re-export is checked here for every public name of each part.
"""

from __future__ import annotations

import inspect
import typing
from types import ModuleType

import pytest

from fleetmpi import spec, spec_fleet


def public_names(module: ModuleType) -> list[str]:
    """Return the names ``module`` defines itself: its classes, functions and UPPER_CASE constants."""
    out = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        defined_here = (inspect.isclass(value) or inspect.isfunction(value)) and value.__module__ == module.__name__
        # Constants are numbers and strings; typing's TYPE_CHECKING (a bool) is imported, not defined.
        if defined_here or (name.isupper() and isinstance(value, int | float | str) and not isinstance(value, bool)):
            out.append(name)
    return sorted(out)


def test_public_names_are_found() -> None:
    # The finder itself: it must see the run side's sections, helpers and bounds, and no imported name.
    names = public_names(spec_fleet)
    assert {"PhaseSpec", "SchedulerSpec", "check_local_fit", "slurm_minutes", "MAX_NODES"} <= set(names)
    assert not {"check", "Mapping", "BadInput", "TYPE_CHECKING"} & set(names)


@pytest.mark.parametrize("name", public_names(spec_fleet))
def test_spec_fleet_name_imports_from_spec(name: str) -> None:
    assert getattr(spec, name) is getattr(spec_fleet, name)
    assert name in spec.__all__


def test_section_types_resolve_where_the_schema_reads_them() -> None:
    # schema.build reads each dataclass's hints in its own module: a moved section must resolve there.
    for cls in (spec.Spec, spec.FleetSpec, spec.PhaseSpec, spec.RuleSpec, spec.SchedulerSpec, spec.NotifySpec):
        hints = typing.get_type_hints(cls)
        assert hints, cls
    assert typing.get_type_hints(spec.Spec)["fleet"] is spec_fleet.FleetSpec
