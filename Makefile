# Set-up is two commands: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two stamps: the demo needs fleetmpi with MPI only; the tests add the dev tools, the
# references the tests compare with, and the gpu-compile extra (463 MB of nvidia-* compiler wheels).
STAMP     := $(VENV)/.fleetmpi-installed
DEV_STAMP := $(VENV)/.fleetmpi-dev-installed
# numba keys its cache by source file and mtime, not by the files a kernel calls into:
# when any kernel source changes, precompile --fresh drops the cache and compiles it all.
KERNEL_SRC := $(wildcard kernels/*.py) fleetmpi/texthash.py
PRECOMPILED := kernels/__pycache__/.fleetmpi-precompiled
PYTEST_ARGS ?=
# make test runs on two pytest-xdist workers: half the suite's wall time is spent waiting (Slurm,
# polling, subprocess start-up). loadgroup keeps the Slurm tests on one worker (tests/conftest.py).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadgroup

.PHONY: install install-dev demo test test-fast faults bench gpu-check lint cluster-up cluster-down clean

install: $(STAMP) $(PRECOMPILED)

install-dev: $(DEV_STAMP) $(PRECOMPILED)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[mpich]'
	touch $(STAMP)

$(DEV_STAMP): setup.py $(STAMP)
	$(PY) -m pip install -q -e '.[mpich,dev,gpu-compile]'
	touch $(DEV_STAMP)

# Compile the CPU kernels into numba's on-disk cache now, so that the first run starts
# within ~1 s of a warm one instead of compiling on every rank (bench/bench_rescale.py).
$(PRECOMPILED): $(STAMP) $(KERNEL_SRC)
	$(PY) -m fleetmpi.engine.precompile --fresh
	mkdir -p $(dir $(PRECOMPILED)) && touch $(PRECOMPILED)

demo: install
	bash examples/quickstart.sh

test: install-dev
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

test-fast: install-dev
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

faults: install-dev   # the fault campaign with full trial counts; table in bench/results/faults.json
	FLEETMPI_FAULTS=full $(PY) -m pytest tests/faults -m faults -s $(PYTEST_ARGS)

bench: install-dev
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0   # PyTorch CPU baseline
	$(PY) -c "import lightgbm, xgboost" 2>/dev/null || $(PY) -m pip install -q lightgbm==4.7.0 xgboost==3.2.0   # tree baselines
	$(PY) bench/run.py

# On a machine with a GPU: every GPU test and bench/bench_gpu.py with GPU_PY (default the python3 on
# PATH), which needs numba-cuda and the gpu-compile extra (pip install -e '.[gpu,gpu-compile]'; see the
# script). Not .venv's python: the GPU machine's own environment brings CUDA, cupy and torch.
GPU_PY ?= python3
gpu-check:
	PY=$(GPU_PY) bash bench/gpu_check.sh

lint: install-dev
	$(VENV)/bin/ruff check fleetmpi kernels tests bench
	$(VENV)/bin/mypy fleetmpi kernels

cluster-up:
	bash jobscripts/minicluster/up.sh

cluster-down:
	bash jobscripts/minicluster/down.sh

clean:
	rm -rf build dist *.egg-info runs/demo-*
