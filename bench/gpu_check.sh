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
# if any step failed. GPU_CHECK_STEP_S bounds each step (seconds; default 1800), so a hung
# step cannot eat a borrowed machine's time; GPU_CHECK_PYTEST_ARGS are added to the tests'
# pytest command line (say "-n 8").
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
    timeout "${GPU_CHECK_STEP_S:-1800}" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}

step device sh -c "nvidia-smi -L; $PY -c 'import numba, numba.cuda as c; print(\"numba\", numba.__version__); c.detect()'"
# Can kernels be built, linked and launched here at all? If not, stop: nothing below could work.
step smoke "$PY" bench/gpu_smoke.py
if [ "$status" != 0 ]; then echo "=== stopped: the smoke step failed"; exit 1; fi
# cuda.core warns once that it links through the driver when nvJitLink is missing: a fact
# about this machine, which pytest.ini's filterwarnings=error would turn into failures.
NOTE_ONLY=(-W "ignore:cuda.bindings.nvjitlink is not available:RuntimeWarning")
# The CPU phases of the cpu -> gpu -> cpu tests and the benchmark's CPU phase use the CPU
# kernels: compiled once here rather than by every test worker at once.
step precompile "$PY" -m fleetmpi.engine.precompile
# What only a GPU can check comes first: the kernel suite on the real device (tests/gpu/sim
# skips only without a GPU) and the real-GPU kernel and phase tests (marked gpu); then the
# benchmarks; then what CI runs too (the simulator runs, the compile check).
# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of pytest options (say "-n 8")
step tests_gpu "$PY" -m pytest -q -rs -p no:cacheprovider "${NOTE_ONLY[@]}" ${GPU_CHECK_PYTEST_ARGS:-} \
    tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_e2e.py -m gpu
step tests_sim_kernels "$PY" -m pytest -q -rs -p no:cacheprovider "${NOTE_ONLY[@]}" tests/gpu/sim
step bench "$PY" bench/bench_gpu.py
step bench_trees "$PY" bench/bench_gpu_trees.py
cp bench/results/gpu.json bench/results/gpu_trees.json "$out/" 2>/dev/null || true
# shellcheck disable=SC2086
step tests_ci "$PY" -m pytest -q -rs -p no:cacheprovider "${NOTE_ONLY[@]}" ${GPU_CHECK_PYTEST_ARGS:-} \
    tests/gpu/test_gpu_kernels.py tests/gpu/test_gpu_compile.py tests/gpu/test_gpu_e2e.py -m "not gpu"
step compile "$PY" -m kernels.gpu_compile
exit $status
