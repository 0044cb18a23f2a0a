#!/usr/bin/env bash
# Start a four-node Slurm test cluster on this host; safe to run again.
#
# Installs slurm-wlm and munge when missing, starts munged, renders slurm.conf
# and gres.conf into the state directory, starts one slurmctld and four
# `slurmd -N nodeN`, and waits until all four nodes are idle. Clients use the
# cluster after `source "$FLEETMPI_CLUSTER_DIR/env.sh"`.
#
# Environment:
#   FLEETMPI_CLUSTER_DIR   state directory (default /tmp/fleetmpi-minicluster)
#   FLEETMPI_CLUSTER_PORT  slurmctld port; node1..node4 use the next four
#                          (default 6817)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE_DIR=${FLEETMPI_CLUSTER_DIR:-/tmp/fleetmpi-minicluster}
CTLD_PORT=${FLEETMPI_CLUSTER_PORT:-6817}
NODES=(node1 node2 node3 node4)
CPUS_PER_NODE=2
WAIT_S=60
CONF=$STATE_DIR/etc/slurm.conf
START_S=$SECONDS
SHOW_MUNGE_LOG=0

# /usr/sbin is missing from PATH in some non-login root shells.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export SLURM_CONF=$CONF

log() { echo "up.sh: $*"; }

show_logs() {
    local f
    local logs=("$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd-*.log)
    ((SHOW_MUNGE_LOG)) && logs=(/var/log/munge/munged.log)
    for f in "${logs[@]}"; do
        [[ -s $f ]] || continue
        echo "----- tail of $f" >&2
        tail -n 25 "$f" >&2
    done
}

die() {
    show_logs
    echo "up.sh: FAILED: $*" >&2
    exit 1
}

# True when the pid in file $1 is alive and its command name is $2.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
    command -v slurmctld >/dev/null || die "slurmctld still missing after apt-get install"
}

ensure_munge_key() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        elif command -v create-munge-key >/dev/null; then
            create-munge-key -f
        else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
    fi
    # munged refuses a key that others can read or that it does not own.
    chown munge:munge /etc/munge "$key"
    chmod 0700 /etc/munge
    chmod 0400 "$key"
}

ensure_munged() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    log "starting munged"
    SHOW_MUNGE_LOG=1
    local d
    for d in /run/munge /var/lib/munge /var/log/munge; do
        mkdir -p "$d"
        chown munge:munge "$d"
    done
    chmod 0755 /run/munge
    chmod 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged || die "munged did not start"
    local i
    for ((i = 0; i < 50; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            SHOW_MUNGE_LOG=0
            return
        fi
        sleep 0.2
    done
    die "munged runs but 'munge -n | unmunge' fails"
}

# Render template $1 to $2; returns 0 when the content changed.
render() {
    local src=$1 dst=$2 tmp
    tmp=$(mktemp "$dst.XXXXXX")
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@PORT_1@|$((CTLD_PORT + 1))|g" \
        -e "s|@PORT_2@|$((CTLD_PORT + 2))|g" \
        -e "s|@PORT_3@|$((CTLD_PORT + 3))|g" \
        -e "s|@PORT_4@|$((CTLD_PORT + 4))|g" \
        -e "s|@HOSTNAME@|$(hostname -s)|g" \
        -e "s|@CPUS@|$CPUS_PER_NODE|g" \
        -e "s|@MEM_MB@|$MEM_MB|g" \
        "$src" >"$tmp"
    chmod 0644 "$tmp"
    if [[ -f $dst ]] && cmp -s "$tmp" "$dst"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$dst"
    return 0
}

render_config() {
    local n changed=0
    mkdir -p "$STATE_DIR"/{etc,log,run,spool/ctld}
    for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/slurmd-$n"; done
    # Each slurmd reports the whole host's memory; give each node a quarter.
    MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 / 4)}' /proc/meminfo)
    render "$HERE/slurm.conf.in" "$CONF" && changed=1
    render "$HERE/gres.conf.in" "$STATE_DIR/etc/gres.conf" && changed=1
    printf 'export SLURM_CONF=%q\nexport FLEETMPI_CLUSTER_DIR=%q\n' "$CONF" "$STATE_DIR" \
        >"$STATE_DIR/env.sh.tmp"
    mv -f "$STATE_DIR/env.sh.tmp" "$STATE_DIR/env.sh"
    if ((changed)) && any_daemon_running; then
        log "configuration changed; restarting the cluster"
        FLEETMPI_CLUSTER_DIR=$STATE_DIR "$HERE/down.sh"
    fi
}

any_daemon_running() {
    local n
    pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld && return 0
    for n in "${NODES[@]}"; do
        pid_alive "$STATE_DIR/run/slurmd-$n.pid" slurmd && return 0
    done
    return 1
}

# Wait up to 5 s for a daemon that just forked to write pid file $1.
wait_pidfile() {
    local i
    for ((i = 0; i < 25; i++)); do
        pid_alive "$1" "$2" && return
        sleep 0.2
    done
    die "$2 did not stay up (no live pid in $1)"
}

# Fail when something else listens on TCP port $1 (e.g. a second cluster).
require_free_port() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        die "port $1 is taken by another process; stop it or set FLEETMPI_CLUSTER_PORT"
    fi
}

start_daemons() {
    local n i
    if ! pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld; then
        require_free_port "$CTLD_PORT"
        log "starting slurmctld"
        slurmctld -f "$CONF" || die "slurmctld exited with status $?"
        wait_pidfile "$STATE_DIR/run/slurmctld.pid" slurmctld
    fi
    for ((i = 0; ; i++)); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        ((i < 100)) || die "slurmctld does not answer 'scontrol ping' after 20 s"
        sleep 0.2
    done
    for i in "${!NODES[@]}"; do
        n=${NODES[i]}
        if ! pid_alive "$STATE_DIR/run/slurmd-$n.pid" slurmd; then
            require_free_port $((CTLD_PORT + 1 + i))
            log "starting slurmd -N $n"
            slurmd -f "$CONF" -N "$n" || die "slurmd -N $n exited with status $?"
            wait_pidfile "$STATE_DIR/run/slurmd-$n.pid" slurmd
        fi
    done
}

wait_for_nodes() {
    local deadline=$((SECONDS + WAIT_S)) states node state ready
    while :; do
        pid_alive "$STATE_DIR/run/slurmctld.pid" slurmctld || die "slurmctld exited"
        for node in "${NODES[@]}"; do
            pid_alive "$STATE_DIR/run/slurmd-$node.pid" slurmd || die "slurmd -N $node exited"
        done
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        ready=0
        while read -r node state; do
            [[ -n $node ]] || continue
            case $state in
                idle | mix | alloc | comp) ready=$((ready + 1)) ;;
                inval) die "node $node is INVAL: its slurmd reports less than slurm.conf says" ;;
                down | drain | drng | fail)
                    # Responding (no '*') but held down, e.g. by recovered state.
                    log "resuming $node (was $state)"
                    scontrol update nodename="$node" state=resume || true
                    ;;
            esac
        done <<<"$states"
        ((ready == ${#NODES[@]})) && return
        ((SECONDS < deadline)) || {
            echo "$states" >&2
            die "only $ready of ${#NODES[@]} nodes became idle within ${WAIT_S} s"
        }
        sleep 0.5
    done
}

[[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts daemons)"
install_packages
ensure_munge_key
ensure_munged
render_config
start_daemons
wait_for_nodes

sinfo
log "cluster up in $((SECONDS - START_S)) s; for clients: source $STATE_DIR/env.sh"
echo "$STATE_DIR/env.sh"
