"""Backends that start one training phase: local (mpiexec) and slurm (sbatch), see .slurm."""

from __future__ import annotations

from typing import Any

__all__ = ["LocalBackend", "find_mpiexec", "worker_env"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the Slurm batch steps (begin/continue, on every rescale) load
    # this package, and .local pulls in numpy and h5py, which they do not need.
    if name in __all__:
        from fleetmpi.launch import local
        return getattr(local, name)
    raise AttributeError(f"module 'fleetmpi.launch' has no attribute {name!r}")
