#!/usr/bin/env bash
# A real SLURM cluster of simulated nodes (n1, n2, ...) on this one host, for tests and demos.
#
#   scripts/slurm-local.sh install        apt-get install slurm-wlm munge (as root; once)
#   scripts/slurm-local.sh start [DIR]    munged + slurmctld + one slurmd per node; prints SLURM_CONF=...
#   scripts/slurm-local.sh stop [DIR]     scontrol shutdown, then munged
#   scripts/slurm-local.sh status [DIR]
#
# DIR (default /tmp/vlmrl-slurm) holds slurm.conf, the daemons' state, pids and logs. Export
# the printed SLURM_CONF before sbatch/srun/squeue. SLURM_LOCAL_NODES nodes (default 2), all
# this host (NodeAddr 127.0.0.1), 2 CPUs each: how FACTS.md measured it. Ports:
# SLURM_LOCAL_CTLD_PORT (16817) and SLURM_LOCAL_NODE_PORT (17001; node k takes 17001 + k - 1), so
# two clusters can coexist. A node whose slurmd stops answering is DOWN after 10 s
# (SlurmdTimeout), so a lost node ends its job quickly.
set -euo pipefail

NODES="${SLURM_LOCAL_NODES:-2}"
NODE_NAMES=$(seq -f 'n%g' 1 "$NODES" | tr '\n' ' ')

cmd="${1:-}"
DIR="${2:-${VLMRL_SLURM_DIR:-/tmp/vlmrl-slurm}}"
CONF="$DIR/slurm.conf"
log() { echo "[slurm-local] $*" >&2; }

install() {
    if command -v sbatch >/dev/null && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed"
        return
    fi
    [ "$(id -u)" = 0 ] || { log "install needs root (apt-get)"; exit 2; }
    log "apt-get install slurm-wlm munge (a minute or two)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host
    local NODE_PORT="${SLURM_LOCAL_NODE_PORT:-17001}"
    host="$(hostname -s)"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF" <<EOF
ClusterName=vlmrl-local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
SlurmUser=root
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-16817}
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
KillWait=5
SlurmdTimeout=10
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE_PORT-$((NODE_PORT + NODES - 1)) CPUs=2 RealMemory=10000
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    command -v slurmctld >/dev/null || { log "SLURM is not installed: $0 install"; exit 2; }
    write_conf
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || create-munge-key; }
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    for n in $NODE_NAMES; do slurmd -f "$CONF" -N "$n"; done
    for _ in $(seq 100); do
        if sinfo -h -o "%t %D" 2>/dev/null | grep -q "^idle $NODES$"; then
            log "nodes ${NODE_NAMES% } idle"
            echo "SLURM_CONF=$CONF"
            return
        fi
        sleep 0.2
    done
    log "nodes did not come up; logs in $DIR/log"
    sinfo >&2 || true
    exit 1
}

stop() {
    if [ -f "$CONF" ]; then
        SLURM_CONF="$CONF" scontrol shutdown >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            pgrep -f "slurm(ctl)?d -f $CONF" >/dev/null || break
            sleep 0.2
        done
        pkill -9 -f "slurm(ctl)?d -f $CONF" 2>/dev/null || true
    fi
    # munged serves every cluster on this host: only the last one stops it
    if ! pgrep -f "slurmctld -f" >/dev/null; then
        pkill -x munged 2>/dev/null || true
    fi
    log "stopped"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
