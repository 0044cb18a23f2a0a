"""Backends that start one training phase: local (mpiexec) and slurm (sbatch), see .slurm."""

from fleetmpi.launch.local import LocalBackend, find_mpiexec, worker_env

__all__ = ["LocalBackend", "find_mpiexec", "worker_env"]
