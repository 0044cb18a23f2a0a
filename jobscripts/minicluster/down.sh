#!/usr/bin/env bash
# Stop the Slurm test cluster that up.sh started; safe to run again.
#
# Cancels jobs, then stops the four slurmd and slurmctld by their pid files,
# falling back to processes that run with our slurm.conf. munged keeps running.
# With --purge it also deletes the state directory (job ids restart at 1).
#
# Environment: FLEETMPI_CLUSTER_DIR as for up.sh.
set -euo pipefail

STATE_DIR=${FLEETMPI_CLUSTER_DIR:-/tmp/fleetmpi-minicluster}
CONF=$STATE_DIR/etc/slurm.conf
PURGE=0
case ${1:-} in
    --purge) PURGE=1 ;;
    "") ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=$CONF

log() { echo "down.sh: $*"; }

# True when pid $1 runs and is not a zombie (this host's pid 1 may not reap).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Pids of slurmctld/slurmd/slurmstepd started with our slurm.conf: on their
# command line (-f CONF) or in their environment (slurmstepd inherits it).
our_pids() {
    local p comm
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        alive "${p#/proc/}" || continue
        case $comm in slurmctld | slurmd | slurmstepd) ;; *) continue ;; esac
        if tr '\0' '\n' 2>/dev/null <"$p/cmdline" | grep -qxF -- "$CONF" \
            || tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qxF -- "SLURM_CONF=$CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

# Send TERM to the given pids, wait up to 10 s, then KILL what is left.
stop_pids() {
    local pid i left
    (($# > 0)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        left=0
        for pid in "$@"; do alive "$pid" && left=1; done
        ((left)) || return 0
        sleep 0.2
    done
    kill -KILL "$@" 2>/dev/null || true
}

pid_from() {
    local f=$1 name=$2 pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]; then
        echo "$pid"
    fi
}

if [[ -f $CONF ]] && command -v scontrol >/dev/null \
    && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs:" "${jobs//$'\n'/ }"
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && break
            sleep 0.25
        done
    fi
fi

slurmds=()
for f in "$STATE_DIR"/run/slurmd-*.pid; do
    [[ -e $f ]] || continue
    pid=$(pid_from "$f" slurmd)
    [[ -n $pid ]] && slurmds+=("$pid")
done
((${#slurmds[@]} == 0)) || log "stopping ${#slurmds[@]} slurmd"
stop_pids "${slurmds[@]}"

ctld=$(pid_from "$STATE_DIR/run/slurmctld.pid" slurmctld)
if [[ -n $ctld ]]; then
    log "stopping slurmctld"
    stop_pids "$ctld"
fi

mapfile -t rest < <(our_pids)
if ((${#rest[@]} > 0)); then
    log "stopping leftover processes: ${rest[*]}"
    stop_pids "${rest[@]}"
fi
rm -f "$STATE_DIR"/run/*.pid

if ((PURGE)); then
    log "removing $STATE_DIR"
    rm -rf "$STATE_DIR"
fi
log "cluster down"
