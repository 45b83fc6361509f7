#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, with real daemons, for the tests in tests/test_slurm.py.
#
#   .ci/slurm_cluster.sh start    install slurm-wlm + munge if missing, write config, start
#                                 munged, slurmctld, slurmd; wait until the node is idle;
#                                 write $CXR_SLURM_DIR/env.sh (source it: exports SLURM_CONF)
#   .ci/slurm_cluster.sh stop     stop the daemons (by the PIDs this script recorded)
#   .ci/slurm_cluster.sh status   exit 0 when the cluster answers, print sinfo
#
# Idempotent: `start` on a running cluster only checks it. Needs root (apt-get, SlurmUser=root).
# Settings: CXR_SLURM_DIR (default /tmp/cxr-slurm), CXR_SLURM_CPUS (default: nproc),
# CXR_SLURM_MEM_MB (default 20000).
set -euo pipefail

DIR="${CXR_SLURM_DIR:-/tmp/cxr-slurm}"
CPUS="${CXR_SLURM_CPUS:-$(nproc)}"
MEM="${CXR_SLURM_MEM_MB:-20000}"
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
SOCKET="$MUNGE_DIR/munge.socket.2"

log() { echo "[slurm_cluster] $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { log "slurm-wlm/munge missing and not root: cannot apt-get install"; exit 1; }
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    # Debian's postinst may have started a system munged/slurm with other keys: stop them,
    # ours run from $DIR with their own socket and state.
    for svc in slurmd slurmctld munge; do
        (command -v systemctl >/dev/null && systemctl stop "$svc") >/dev/null 2>&1 || true
    done
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,run} "$MUNGE_DIR"
    chmod 0711 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$MUNGE_DIR/munge.key"
    cat > "$CONF" <<CONF
# Written by .ci/slurm_cluster.sh: a single-node test cluster.
ClusterName=cxr-ci
SlurmctldHost=localhost
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default
# 120 s, measured here: ~175 s from requeue to restart). 10 s keeps the preemption test short.
AuthInfo=socket=$SOCKET,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${CXR_SLURMCTLD_PORT:-6817}
SlurmdPort=${CXR_SLURMD_PORT:-6818}
# Enough time for a preempted job to write its checkpoint after SIGTERM.
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    cat > "$DIR/env.sh" <<ENV
export SLURM_CONF=$CONF
ENV
}

alive() {  # alive NAME: the daemon recorded in $DIR/run/NAME.pid is running
    local f="$DIR/run/$1.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

answers() { SLURM_CONF="$CONF" timeout 10 sinfo -h >/dev/null 2>&1; }

start() {
    install_packages
    if alive munged && alive slurmctld && alive slurmd && answers; then
        log "already running ($CONF)"
        wait_idle
        return
    fi
    stop_daemons quiet
    write_config
    log "starting munged, slurmctld, slurmd in $DIR"
    munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$SOCKET" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$MUNGE_DIR/munge.seed"
    for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
    # -c: forget the jobs of an earlier cluster in the same folder.
    setsid slurmctld -D -c -f "$CONF" >>"$DIR/log/slurmctld.stdout" 2>&1 < /dev/null &
    echo $! > "$DIR/run/slurmctld.pid"
    setsid slurmd -D -N localhost -f "$CONF" >>"$DIR/log/slurmd.stdout" 2>&1 < /dev/null &
    echo $! > "$DIR/run/slurmd.pid"
    wait_idle
    log "ready: source $DIR/env.sh  (SLURM_CONF=$CONF)"
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -n localhost -o %t 2>/dev/null || true)"
        case "$state" in
            idle*|mix*|alloc*) return 0 ;;
            down*|drain*) SLURM_CONF="$CONF" scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node not idle after 60 s (state: '${state:-no answer}'); logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop_daemons() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -s "$DIR/run/$name.pid" ] || continue
        pid="$(cat "$DIR/run/$name.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$name.pid"
    done
    [ "${1:-}" = quiet ] || log "stopped"
}

status() {
    if answers; then
        SLURM_CONF="$CONF" sinfo
        return 0
    fi
    log "not running ($CONF)"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
