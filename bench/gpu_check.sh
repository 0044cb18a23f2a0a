#!/usr/bin/env bash
# Everything that needs a real GPU, in one command: for a GPU node or a borrowed GPU machine.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default bench/results/gpu-check)
#
# Uses the python on PATH (or $PY) with fleetmpi from this checkout on PYTHONPATH, not
# installed: numba-cuda, numpy, h5py, mpi4py, pyyaml, psutil, tqdm and pytest must import
# (cupy and nvidia-ml-py when present are used). The GPU phase tests and benchmark run
# `fleetmpi run`, so they need an mpiexec: the one beside python, $FLEETMPI_MPIEXEC, or
# the first on PATH. Each step's output goes to OUT_DIR/<step>.txt; the exit status is 1
# if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
out=${1:-${OUT:-bench/results/gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FLEETMPI_PROGRESS=none
unset NUMBA_ENABLE_CUDASIM
status=0

step() {
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}

step device sh -c "nvidia-smi -L; $PY -c 'import numba, numba.cuda as c; print(\"numba\", numba.__version__); c.detect()'"
step compile "$PY" -m kernels.gpu_compile
# Every GPU test: the kernel suite on the real device (tests/gpu/sim skips only without a
# GPU), the real-GPU kernel and phase tests (marked gpu), the simulator runs as in CI.
step tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/sim tests/gpu/test_gpu_kernels.py \
    tests/gpu/test_gpu_compile.py tests/gpu/test_gpu_e2e.py
step bench "$PY" bench/bench_gpu.py
cp bench/results/gpu.json "$out/" 2>/dev/null || true
exit $status
