#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests (tests/test_slurm.py) and for trying
# the ablation grid's Slurm executor by hand (docs/CLUSTER.md). Run as root. It installs Slurm and
# munge when they are missing (apt-get install -y slurm-wlm munge: Debian or Ubuntu), writes a
# munge key (when there is none) and /etc/slurm/slurm.conf (this host as controller and only
# compute node, its real CPUs and memory from `slurmd -C`, one partition `local`, every address
# 127.0.0.1), starts munged, slurmctld and slurmd, and waits until the node takes jobs.
#
# Idempotent: daemons that already run are kept (restarted only when slurm.conf changed), and a
# node left DOWN or DRAINED by an earlier run is resumed. Prints how long the set-up took.
# `tools/slurm/start_local_slurm.sh --stop` stops the three daemons it started.
set -euo pipefail
start=$(date +%s.%N)
PARTITION=local
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm/simformer
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGED_PID=/run/munge/munged.pid

say() { echo "start_local_slurm: $*"; }
die() { echo "start_local_slurm: error: $*" >&2; exit 1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {    # $1 pid file
    if running "$1"; then
        local pid; pid=$(cat "$1"); kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

[ "$(id -u)" = 0 ] || die "run as root (it writes /etc/slurm and starts daemons)"
if [ "${1:-}" = "--stop" ]; then
    stop "$SLURMD_PID"; stop "$CTLD_PID"; stop "$MUNGED_PID"
    say "stopped"; exit 0
fi
BINARIES="munged munge unmunge slurmctld slurmd sinfo sbatch scontrol scancel squeue"
missing() { for b in $BINARIES; do command -v "$b" >/dev/null || { echo "$b"; return; }; done; }
if [ -n "$(missing)" ]; then
    command -v apt-get >/dev/null || die "'$(missing)' is not installed, and there is no apt-get: install Slurm and munge"
    t=$(date +%s.%N)
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install -y slurm-wlm munge failed"
    say "installed in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t}") s"
fi
[ -z "$(missing)" ] || die "'$(missing)' is still not on PATH after installing slurm-wlm and munge"

# --- munge: the key and the daemon -------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    say "created a munge key"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- munged --pid-file="$MUNGED_PID" 2>/dev/null || runuser -u munge -- munged
    for _ in $(seq 100); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
    say "munged started"
fi

# --- slurm.conf: this host, its real CPUs and memory -------------------------------------------
host=$(hostname -s)
node=$(slurmd -C 2>/dev/null | head -n1)        # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
case "$node" in NodeName=*) ;; *) die "'slurmd -C' printed no node line: $node";; esac
# leave 512 MB to the system, else slurmd reports less memory than configured and the node drains
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
node=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( mem > 1024 ? mem - 512 : mem ))/" <<<"$node")
install -d -m 0755 /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
want=$(cat <<EOF
# written by tools/slurm/start_local_slurm.sh: a single-node cluster on this machine
ClusterName=simformer-local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmdTimeout=300
$(sed "s/^NodeName=[^ ]*/NodeName=${host} NodeAddr=127.0.0.1/" <<<"$node") State=UNKNOWN
PartitionName=$PARTITION Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
    printf '%s\n' "$want" >"$CONF"
    changed=1
    say "wrote $CONF"
fi

# --- the daemons -------------------------------------------------------------------------------
if [ "$changed" = 1 ]; then stop "$SLURMD_PID"; stop "$CTLD_PID"; fi
if ! running "$CTLD_PID"; then
    slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"
    say "slurmctld started"
fi
if ! running "$SLURMD_PID"; then
    slurmd || die "slurmd did not start (see $LOGS/slurmd.log)"
    say "slurmd started"
fi

# --- wait until the node takes jobs ------------------------------------------------------------
state=""
for _ in $(seq 150); do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mix|alloc|comp) break;;
        down*|drain*|drng*|fail*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mix|alloc|comp) ;;
    *) die "node $host is '${state:-not answering}' after 30 s (see $LOGS/slurmctld.log, $LOGS/slurmd.log)";;
esac
say "Slurm ready: partition '$PARTITION', node $host ($(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node") CPUs), \
state $state; set-up took $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s"
