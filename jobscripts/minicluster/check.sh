#!/usr/bin/env bash
# Smoke-test the running test cluster: sinfo, srun on both partitions, one sbatch.
#
# Exits non-zero at the first step that fails. Environment: FLEETMPI_CLUSTER_DIR
# as for up.sh.
set -euo pipefail

STATE_DIR=${FLEETMPI_CLUSTER_DIR:-/tmp/fleetmpi-minicluster}
[[ -f $STATE_DIR/env.sh ]] || { echo "check.sh: FAILED: no $STATE_DIR/env.sh; run up.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
source "$STATE_DIR/env.sh"

step() { printf '\n== %s\n' "$*"; }
fail() { echo "check.sh: FAILED: $*" >&2; exit 1; }

step "sinfo"
sinfo
sinfo -N -l

step "srun -p cpu -N 2 -n 4 hostname"
out=$(timeout 60 srun -p cpu -N 2 -n 4 hostname) || fail "srun on cpu"
echo "$out"
(($(wc -l <<<"$out") == 4)) || fail "expected 4 lines from 4 tasks"

step "srun -p cpu -N 2 -n 4: SLURMD_NODENAME and SLURM_PROCID per task"
out=$(timeout 60 srun -p cpu -N 2 -n 4 -l printenv SLURMD_NODENAME | sort) || fail "srun on cpu"
echo "$out"
if ! grep -q node1 <<<"$out" || ! grep -q node2 <<<"$out"; then
    fail "tasks did not land on node1 and node2"
fi

step "srun -p gpu --gres=gpu:1 -N1 env | grep GPU variables"
out=$(timeout 60 srun -p gpu --gres=gpu:1 -N 1 env) || fail "srun on gpu"
grep -E 'SLURM_JOB_GPUS|CUDA_VISIBLE|SLURM_GPUS|SLURMD_NODENAME' <<<"$out" || fail "no GPU variables in the job environment"

step "sbatch --wait"
dir=$(mktemp -d "$STATE_DIR/check.XXXXXX")
start=$SECONDS
# shellcheck disable=SC2016  # expanded in the job, not here
jobid=$(sbatch --parsable --wait -p cpu -N 2 --ntasks-per-node=2 -o "$dir/%j.out" \
    --wrap 'echo "batch on $SLURMD_NODENAME, nodes $SLURM_JOB_NODELIST"; srun -l hostname') \
    || fail "sbatch --wait returned non-zero"
echo "job $jobid finished in $((SECONDS - start)) s; output:"
cat "$dir/$jobid.out"
(($(grep -c ': ' "$dir/$jobid.out") == 4)) || fail "batch step did not run 4 tasks"
rm -rf "$dir"

echo
echo "check.sh: OK"
