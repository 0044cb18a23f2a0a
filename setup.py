"""fleetmpi: data-parallel training over MPI ranks whose fleet changes while it trains."""

from setuptools import find_packages, setup

setup(
    name="fleetmpi",
    version="0.1.0",
    description="Data-parallel training over MPI ranks that rescales itself by rules (local mpiexec, Slurm)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fleetmpi", "fleetmpi.*", "kernels", "kernels.*"]),
    install_requires=[
        "numpy>=1.26",
        "numba>=0.60",
        "mpi4py>=4.0",
        "h5py>=3.10",
        "pyyaml>=6.0",
        "psutil>=5.9",
        "tqdm>=4.66",
    ],
    extras_require={
        # MPI from PyPI: the wheel's mpiexec lands next to the venv's python.
        "mpich": ["mpich"],
        "gpu": ["cupy-cuda12x", "nvidia-ml-py"],
        "plot": ["matplotlib>=3.8"],
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "mypy", "scikit-learn", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["fleetmpi=fleetmpi.cli:main"]},
)
