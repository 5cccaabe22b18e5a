#!/usr/bin/env bash
# Start, stop or query a real single-node SLURM cluster on this machine (for tests/test_slurm.py and for
# trying workflow/profiles/slurm without a cluster; docs/cluster.md).
#
#   tools/slurm-local.sh start    install slurm-wlm + munge if missing (apt-get, needs root), write
#                                 /etc/slurm/slurm.conf, start munged, slurmctld and slurmd, wait until the
#                                 node is idle; does nothing to daemons that already run (idempotent)
#   tools/slurm-local.sh stop     kill the daemons this script started (by the pids in their pid files)
#   tools/slurm-local.sh status   print the daemons' state and `sinfo`; exit 0 when the cluster is up
#                                 (node idle, mixed or allocated), 3 when it is not
#
# The configuration is cgroup-free (proctrack/linuxproc, task/none: works in containers without a
# writable cgroup tree), has no accounting (no slurmdbd; `sacct` does not work, so run Snakemake with
# `--slurm-status-command squeue`) and one default partition holding the one node, sized from
# `slurmd -C`. It lives at /etc/slurm/slurm.conf because the executor plugin's job step does not keep
# SLURM_CONF. An existing slurm.conf that this script did not write is never overwritten.
#
# Environment: SLURM_LOCAL_TIMEOUT (seconds to wait for the idle node, default 60),
#              SLURM_LOCAL_PARTITION (partition name, default "local").
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by actdiff tools/slurm-local.sh"
PARTITION=${SLURM_LOCAL_PARTITION:-local}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
LOGDIR=/var/log/slurm
CTLD_LOG=$LOGDIR/slurmctld.log
SLURMD_LOG=$LOGDIR/slurmd.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_KEY=/etc/munge/munge.key

die() {
    echo "slurm-local: ERROR: $*" >&2
    exit 1
}
say() { echo "slurm-local: $*"; }

# pid from a pid file if that process is alive and is the expected program, else nothing
alive_pid() { # pidfile comm
    local pid
    [[ -r $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]] || return 1
    echo "$pid"
}

log_tails() {
    local f
    for f in "$MUNGE_LOG" "$CTLD_LOG" "$SLURMD_LOG"; do
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2 2>/dev/null || echo "(missing)" >&2
    done
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes $CONF, starts daemons)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null ||
        die "slurmctld/slurmd/munged still missing after apt-get install"
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local node node_line
    node=$(hostname -s)
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected output of slurmd -C: $node_line"
    getent hosts "$node" >/dev/null || die "host name '$node' does not resolve (add it to /etc/hosts)"
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER; rewritten on every start.
# Single-node test cluster: no cgroups, no accounting, one partition.
ClusterName=actdiff-local
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
# cgroup-free process tracking and task launch (works in containers)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# no slurmdbd: no accounting storage, no job accounting gathering, no job completion log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# CPUs and memory are consumable, so jobs queue instead of oversubscribing the node
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
# finished jobs stay visible to squeue for 10 minutes (Snakemake polls job states with squeue)
MinJobAge=600
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
# every Snakemake start imports the SLURM executor plugin, which runs \`scontrol show config\` (MinJobAge);
# with the daemons stopped a client retries for MessageTimeout - 1 s: 9 s per Snakemake start at the default 10,
# 2 s at 3, which is still ample for a round trip on one node
MessageTimeout=3
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$tmp" "$CONF" 2>/dev/null; then
        install -m 0644 "$tmp" "$CONF"
        say "wrote $CONF"
        CONF_CHANGED=1
    fi
    rm -f "$tmp"
}

start_munge() {
    if alive_pid "$MUNGE_PID" munged >/dev/null; then
        return
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating $MUNGE_KEY"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY" /etc/munge
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 /etc/munge
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    say "starting munged"
    runuser -u munge -- munged --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" ||
        { log_tails; die "munged did not start"; }
    local i
    for i in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log_tails
    die "munge does not answer (munge -n | unmunge)"
}

start_daemon() { # name pidfile
    if alive_pid "$2" "$1" >/dev/null; then
        if [[ ${CONF_CHANGED:-0} -eq 1 ]]; then
            say "$1 runs with an older $CONF; reconfiguring"
            scontrol reconfigure || true
        fi
        return
    fi
    say "starting $1"
    "$1" || { log_tails; die "$1 did not start"; }
}

node_state() { sinfo -h -N -o %t 2>/dev/null | head -n 1; }

cmd_start() {
    need_root
    install_packages
    CONF_CHANGED=0
    write_config
    start_munge
    start_daemon slurmctld "$CTLD_PID"
    start_daemon slurmd "$SLURMD_PID"
    local node state deadline resumed=0
    node=$(hostname -s)
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
        idle | mix | alloc | comp)
            say "node $node is $state (partition $PARTITION)"
            return 0
            ;;
        drain* | drng | down*)
            # left over from an earlier run that was stopped while jobs ran, or a node that registered
            # before slurmd was up: put it back in service once
            if ((resumed == 0)); then
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        sleep 1
    done
    sinfo -N -l >&2 || true
    log_tails
    die "node $node not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}')"
}

stop_one() { # name pidfile
    local pid i
    if pid=$(alive_pid "$2" "$1"); then
        say "stopping $1 (pid $pid)"
        kill "$pid"
        for i in $(seq 100); do
            [[ -d /proc/$pid ]] || return 0
            sleep 0.1
        done
        say "$1 (pid $pid) did not exit after 10 s; sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
}

cmd_stop() {
    need_root
    stop_one slurmd "$SLURMD_PID"
    stop_one slurmctld "$CTLD_PID"
    stop_one munged "$MUNGE_PID"
    say "stopped"
}

cmd_status() {
    local name pidfile pid up=1 state
    for name in munged slurmctld slurmd; do
        case $name in
        munged) pidfile=$MUNGE_PID ;;
        slurmctld) pidfile=$CTLD_PID ;;
        slurmd) pidfile=$SLURMD_PID ;;
        esac
        if pid=$(alive_pid "$pidfile" "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
            up=0
        fi
    done
    if ((up)); then
        sinfo || true
        state=$(node_state)
        case $state in
        idle | mix | alloc | comp) return 0 ;;
        esac
        echo "node state: '${state}'"
    fi
    return 3
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
