"""fleetmpi: data-parallel training over MPI ranks whose fleet changes while it trains."""

__version__ = "0.1.0"


# The Python API (fleetmpi.api), imported on first use so `import fleetmpi` stays light.
_LAZY = {"submit": "api", "queue": "api", "sweep": "api", "Job": "api", "JobFailed": "api", "Result": "api"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
