#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the launcher's Slurm tests (run as root).
#
#   bash tests/slurm/cluster.sh up       # install (apt, once), configure, start; waits until both nodes are idle
#   bash tests/slurm/cluster.sh status   # daemons and nodes
#   bash tests/slurm/cluster.sh down     # stop every daemon this script started
#
# Debian's munge, slurmctld and two slurmd daemons (node1, node2 on 127.0.0.1 with distinct ports),
# 2 fake GPUs per node (gres backed by empty files), a preemptable `low` partition (default, REQUEUE,
# GraceTime) and a high-priority `high` one. With LAUNCHER_SLURM_ACCOUNTING=1 (default) it also runs
# slurmdbd on a local MariaDB so `sacct` works as on real clusters; LAUNCHER_SLURM_ACCOUNTING=0 gives
# the no-accounting cluster (sacct fails: the launcher must fall back to squeue and the run dir).
# Everything lives under $STATE_DIR; /etc/slurm/slurm.conf is a symlink so clients need no SLURM_CONF.
# Facts and traps (Slurm 22.05): docs/slurm_test_cluster.md.
set -euo pipefail

STATE_DIR=${LAUNCHER_SLURM_STATE:-/var/lib/launcher-slurm-test}
ACCOUNTING=${LAUNCHER_SLURM_ACCOUNTING:-1}
CONF_DIR=$STATE_DIR/etc
CONF=$CONF_DIR/slurm.conf
HOST=$(hostname -s)
DB_PORT=17306
DBD_PORT=17819
DB_SOCK=$STATE_DIR/mysql/mysqld.sock
GRACE_S=${LAUNCHER_SLURM_GRACE_S:-30}

log() { echo "[cluster.sh] $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (it installs packages and starts system daemons)"
        exit 2
    fi
}

install_packages() {
    local pkgs=(munge slurmctld slurmd slurm-client)
    [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

render_conf() {
    local acct_lines
    if [ "$ACCOUNTING" = 1 ]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi
    cat <<EOF
# Written by tests/slurm/cluster.sh - do not edit (it is rewritten on 'up').
ClusterName=test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=17817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
$acct_lines
GresTypes=gpu
MaxArraySize=1001
MinJobAge=600
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# 22.05 spelling: send the job's --signal (USR2) at preemption, then SIGTERM after the GraceTime.
SlurmctldParameters=preempt_send_user_signal
SchedulerParameters=defer
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=low Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_S
PartitionName=high Nodes=node[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

render_dbd_conf() {
    cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE_DIR/log/slurmdbd.log
PidFile=$STATE_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=launcher-test
StorageLoc=slurm_acct_db
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    log "starting munged"
    su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.2; done
    log "munged did not come up"; exit 1
}

start_mariadb() {
    if [ -S "$DB_SOCK" ] && mariadb --socket="$DB_SOCK" -e "select 1" >/dev/null 2>&1; then return; fi
    if [ ! -d "$STATE_DIR/mysql/data/mysql" ]; then
        log "initialising MariaDB in $STATE_DIR/mysql"
        mkdir -p "$STATE_DIR/mysql/data"
        mariadb-install-db --user=root --datadir="$STATE_DIR/mysql/data" \
            --auth-root-authentication-method=socket >"$STATE_DIR/log/mariadb-install.log" 2>&1
    fi
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid nohup mariadbd --user=root --datadir="$STATE_DIR/mysql/data" --socket="$DB_SOCK" \
        --port=$DB_PORT --bind-address=127.0.0.1 --pid-file="$STATE_DIR/mysql/mariadb.pid" \
        --log-error="$STATE_DIR/log/mariadb.log" --innodb-buffer-pool-size=64M \
        --skip-name-resolve </dev/null >/dev/null 2>&1 &
    for _ in $(seq 100); do
        mariadb --socket="$DB_SOCK" -e "select 1" >/dev/null 2>&1 && break
        sleep 0.3
    done
    mariadb --socket="$DB_SOCK" -e "select 1" >/dev/null 2>&1 || { log "MariaDB did not start"; return 1; }
    mariadb --socket="$DB_SOCK" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'launcher-test';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'launcher-test';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    if pid_alive "$STATE_DIR/slurmdbd.pid" && sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; then
        return
    fi
    log "starting slurmdbd"
    slurmdbd
    for _ in $(seq 120); do
        sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; then
        log "slurmdbd did not answer; see $STATE_DIR/log/slurmdbd.log"
        return 1
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx test; then
        sacctmgr -i add cluster test >/dev/null
    fi
}

write_files() {
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{state,log,spool} /etc/slurm
    : >"$STATE_DIR/fakegpu0"
    : >"$STATE_DIR/fakegpu1"
    local new=$CONF.new changed=0
    render_conf >"$new"
    if ! cmp -s "$new" "$CONF"; then mv "$new" "$CONF"; changed=1; else rm -f "$new"; fi
    # Count must match File: two empty files stand in for the two GPUs of each node.
    echo "Name=gpu File=$STATE_DIR/fakegpu[0-1]" >"$CONF_DIR/gres.conf"
    if [ "$ACCOUNTING" = 1 ]; then
        render_dbd_conf >"$CONF_DIR/slurmdbd.conf"
        chmod 600 "$CONF_DIR/slurmdbd.conf"
        ln -sfn "$CONF_DIR/slurmdbd.conf" /etc/slurm/slurmdbd.conf
    fi
    ln -sfn "$CONF" /etc/slurm/slurm.conf
    ln -sfn "$CONF_DIR/gres.conf" /etc/slurm/gres.conf
    # MASTER_ADDR=node1 must resolve inside jobs.
    grep -qE '^127\.0\.0\.1[[:space:]]+node1 node2$' /etc/hosts || echo "127.0.0.1 node1 node2" >>/etc/hosts
    echo $changed
}

nodes_idle() {
    local out
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [ "$(echo "$out" | grep -cE '^node[12] (idle|mix|alloc)$')" = 2 ]
}

stop_all() {
    local f
    for f in "$STATE_DIR"/slurmd-node1.pid "$STATE_DIR"/slurmd-node2.pid "$STATE_DIR"/slurmctld.pid \
        "$STATE_DIR"/slurmdbd.pid "$STATE_DIR"/mysql/mariadb.pid; do
        if pid_alive "$f"; then
            local pid
            pid=$(cat "$f")
            log "stopping $(basename "$f" .pid) ($pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$f"
    done
}

up() {
    need_root
    install_packages
    local changed
    changed=$(write_files)
    if [ "$changed" = 0 ] && pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd-node1.pid" \
        && pid_alive "$STATE_DIR/slurmd-node2.pid" && nodes_idle; then
        log "already up"
        return 0
    fi
    [ "$changed" = 1 ] && stop_all
    start_munge
    if [ "$ACCOUNTING" = 1 ]; then
        if ! { start_mariadb && start_slurmdbd; }; then
            log "accounting could not start: falling back to a cluster without slurmdbd"
            ACCOUNTING=0
            stop_all
            write_files >/dev/null
        fi
    fi
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld -f "$CONF"
    fi
    for n in node1 node2; do
        if ! pid_alive "$STATE_DIR/slurmd-$n.pid"; then
            log "starting slurmd $n"
            slurmd -N "$n" -f "$CONF"
        fi
    done
    for _ in $(seq 120); do
        nodes_idle && break
        # A node left DOWN/DRAIN by an earlier unclean stop comes back with resume.
        if sinfo -h -N -o '%t' 2>/dev/null | grep -qE 'down|drain'; then
            scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    if ! nodes_idle; then
        log "nodes did not become idle:"; sinfo -N >&2 || true
        exit 1
    fi
    log "up: $(sinfo -h -N -o '%N:%t' | sort -u | tr '\n' ' ') accounting=$ACCOUNTING"
}

status() {
    local f
    for f in slurmctld slurmd-node1 slurmd-node2 slurmdbd mysql/mariadb; do
        if pid_alive "$STATE_DIR/$f.pid"; then echo "$f: running ($(cat "$STATE_DIR/$f.pid"))"; else echo "$f: stopped"; fi
    done
    sinfo -N 2>/dev/null || echo "sinfo: no answer"
    sacct -n -X -o JobID -S now >/dev/null 2>&1 && echo "accounting: on" || echo "accounting: off"
    nodes_idle
}

case "${1:-}" in
    up) up ;;
    down) need_root; stop_all; log "down" ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
