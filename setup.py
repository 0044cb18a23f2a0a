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
        # GPU phases: numba-cuda (numba's own CUDA target is deprecated) with the CUDA wheels,
        # cupy for the MLP's BLAS, NVML for gpu_util. cu12 runs on any driver >= 525;
        # gpu-cu13 for CUDA 13 tool chains.
        "gpu": ["numba-cuda[cu12]", "cupy-cuda12x", "nvidia-ml-py"],
        "gpu-cu13": ["numba-cuda[cu13]", "cupy-cuda13x", "nvidia-ml-py"],
        # Compile the GPU kernels for real GPUs without one (tests/test_gpu_compile.py,
        # python -m kernels.gpu_compile): NVVM, NVRTC and ptxas from wheels, no driver.
        "gpu-compile": ["numba-cuda", "cuda-bindings>=13,<14", "nvidia-nvvm>=13,<14", "nvidia-cuda-nvrtc>=13,<14",
                        "nvidia-cuda-nvcc>=13,<14"],
        "plot": ["matplotlib>=3.8"],
        # Experiment trackers (monitor.tensorboard, monitor.mlflow): the skinny MLflow client is
        # enough for the job dir's own file store.
        "tensorboard": ["tensorboard>=2.14"],
        "mlflow": ["mlflow-skinny>=2.9"],
        # make-data --from parquet and predict on .parquet files.
        "parquet": ["pyarrow>=14"],
        # pandas reads the reference tables of the own-data tests; pyarrow their Parquet files;
        # statsmodels is the AutoReg reference of the time-series tests; tensorboard and mlflow-skinny
        # read the trackers' files back (tests/mpi/test_trackers.py); pytest-xdist runs `make test`
        # on two workers (much of the suite waits on subprocesses and Slurm, not on a core).
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.8", "ruff", "mypy", "scikit-learn", "matplotlib>=3.8",
                "pandas>=2.1", "pyarrow>=14", "statsmodels", "tensorboard>=2.14", "mlflow-skinny>=2.9"],
    },
    entry_points={"console_scripts": ["fleetmpi=fleetmpi.cli:main"]},
)
