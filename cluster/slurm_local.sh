#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and for trying the launcher: munge, MariaDB +
# slurmdbd (submitit polls `sacct`, so accounting must run), slurmctld and slurmd. Debian 12, as
# root, without systemd. Every daemon writes a PID file under the state directory and is stopped by
# that PID, never by name.
#
#   bash cluster/slurm_local.sh install   # apt-get the packages (idempotent)
#   bash cluster/slurm_local.sh start     # write the configs, start the daemons (idempotent)
#   bash cluster/slurm_local.sh status    # PIDs, `sinfo`, and the SLURM_CONF line to export
#   bash cluster/slurm_local.sh stop      # cancel the jobs, stop the daemons by PID
#   bash cluster/slurm_local.sh env       # prints `export SLURM_CONF=...` (eval "$(... env)")
#
# Settings (environment):
#   WSOL_SLURM_DIR        state, configs, logs, PID files       [/var/tmp/wsol-slurm]
#   WSOL_SLURM_PORT       first of 4 ports: slurmctld, slurmd, slurmdbd, MariaDB   [6817]
#   WSOL_SLURM_PARTITION  the partition's name                  [debug]
#   WSOL_SLURM_CPUS       CPUs the node advertises              [nproc, OMP_NUM_THREADS aside]
#
# slurmctld, slurmd and MariaDB listen on 127.0.0.1 only; munged on its default socket
# /run/munge/munge.socket.2 (sacct/sacctmgr ignore AuthInfo=socket= towards slurmdbd) with its own
# key in the state directory. slurmdbd 22.05 has no option to choose its listen address, so it
# binds all addresses on its port; every request to it is munge-authenticated. Client commands find
# the cluster through SLURM_CONF=$WSOL_SLURM_DIR/etc/slurm.conf; /etc/slurm/slurm.conf is also
# linked to it when that file does not exist.
set -euo pipefail

STATE="${WSOL_SLURM_DIR:-/var/tmp/wsol-slurm}"
PORT="${WSOL_SLURM_PORT:-6817}"
PARTITION="${WSOL_SLURM_PARTITION:-debug}"
# The CPUs this process may use, as slurmd counts them. GNU nproc also honours OMP_NUM_THREADS
# (coreutils' manual), which a shell or the test suite sets for torch's threads, not for the node.
machine_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }
CPUS="${WSOL_SLURM_CPUS:-$(machine_cpus)}"
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
DB_PASS="wsol-local-slurmdbd"   # MariaDB is reachable from 127.0.0.1 only; a test cluster
CLUSTER=wsol
NODE="$(hostname -s)"
PACKAGES=(munge mariadb-server mariadb-client slurmctld slurmd slurmdbd slurm-client)

ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
MUNGE_DIR="$STATE/munge"          # key and seed
MUNGE_SOCKET=/run/munge/munge.socket.2
DB_DIR="$STATE/mysql"
DB_RUN="$STATE/mysqld"          # owned by mysql: its socket and PID file
DB_SOCK="$DB_RUN/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"

say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (it starts munged, MariaDB and the SLURM daemons)"; }

# ---------------------------------------------------------------------------------------- install
cmd_install() {
    need_root
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Without systemd the packages' postinst scripts cannot start the services; that is intended.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ------------------------------------------------------------------------------------ PID helpers
pidfile() {
    case $1 in
        mariadb) echo "$DB_RUN/mariadb.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}

pid_of() {  # pid_of NAME -> prints the PID if the PID file names a live process
    local f pid
    f="$(pidfile "$1")"
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            say "timed out after ${secs}s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

stop_pid() {  # stop_pid NAME: SIGTERM the PID from its file, SIGKILL after 30 s
    local name=$1 pid
    if ! pid="$(pid_of "$name")"; then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            say "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$(pidfile "$name")"
}

# ------------------------------------------------------------------------------------- configs
mem_mb() { awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo; }

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd"
    chmod 0755 "$STATE" "$ETC" "$RUN" "$LOG"
    cat >"$ETC/slurm.conf.new" <<EOF
# Written by cluster/slurm_local.sh: a one-node test cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$(mem_mb) State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [ "$CPUS" != "$(machine_cpus)" ]; then
        echo "SlurmdParameters=config_overrides" >>"$ETC/slurm.conf.new"
    fi
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
    chmod 0644 "$ETC/slurm.conf"

    (umask 077 && cat >"$ETC/slurmdbd.conf" <<EOF
# Written by cluster/slurm_local.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    chmod 0600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a readable one (it holds the password)

    # `sinfo` from a plain shell: link the default path when nothing else is there.
    if [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
        mkdir -p /etc/slurm
        ln -s "$ETC/slurm.conf" /etc/slurm/slurm.conf
    fi
}

# ------------------------------------------------------------------------------------- daemons
start_munge() {
    # The default socket: sacctmgr/sacct ignore slurm.conf's AuthInfo=socket= when they talk to
    # slurmdbd, so a private socket is not an option. A munged that already answers there is used.
    if pid_of munged >/dev/null; then return 0; fi
    if munge -n >/dev/null 2>&1; then
        say "munged already answers on $MUNGE_SOCKET (not started by this script): using it"
        return 0
    fi
    mkdir -p "$MUNGE_DIR" "$(dirname "$MUNGE_SOCKET")"
    chown munge:munge "$MUNGE_DIR" "$(dirname "$MUNGE_SOCKET")"
    chmod 0700 "$MUNGE_DIR"
    chmod 0755 "$(dirname "$MUNGE_SOCKET")"   # clients (root, job users) must reach the socket
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    touch "$RUN/munged.pid" "$LOG/munged.log"
    chown munge:munge "$RUN/munged.pid" "$LOG/munged.log"
    say "starting munged (user munge)"
    runuser -u munge -- /usr/sbin/munged \
        --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged did not start; see $LOG/munged.log"
    wait_for 20 "munged" pid_of munged || die "munged did not start; see $LOG/munged.log"
    wait_for 20 "munge socket" munge -n || die "munged does not answer; see $LOG/munged.log"
}

# shellcheck disable=SC2120  # called with arguments through wait_for
db() { mariadb --no-defaults --socket="$DB_SOCK" -u root "$@"; }

start_mariadb() {
    if pid_of mariadb >/dev/null; then return 0; fi
    if [ ! -d "$DB_DIR/mysql" ]; then
        say "initializing MariaDB in $DB_DIR"
        mkdir -p "$DB_DIR"
        chown mysql:mysql "$DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
    fi
    mkdir -p "$DB_RUN"
    chown mysql:mysql "$DB_RUN"
    chmod 0755 "$DB_RUN"
    touch "$LOG/mariadb.log"
    chown mysql:mysql "$LOG/mariadb.log"
    rm -f "$DB_RUN/mariadb.pid"
    say "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --pid-file="$DB_RUN/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
        --skip-name-resolve </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 "MariaDB" db -e "SELECT 1" || die "MariaDB did not start; see $LOG/mariadb.log"
    wait_for 10 "MariaDB PID file" pid_of mariadb || die "MariaDB wrote no PID file; see $LOG/mariadb.log"
    # shellcheck disable=SC2119
    db <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    if pid_of slurmdbd >/dev/null; then return 0; fi
    say "starting slurmdbd on 127.0.0.1:$DBD_PORT"   # reads slurmdbd.conf beside $SLURM_CONF
    /usr/sbin/slurmdbd || die "slurmdbd did not start; see $LOG/slurmdbd.log"
    wait_for 30 "slurmdbd" pid_of slurmdbd || die "slurmdbd did not start; see $LOG/slurmdbd.log"
    wait_for 60 "slurmdbd to answer" sacctmgr -i -n list cluster || die "slurmdbd does not answer; see $LOG/slurmdbd.log"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    if pid_of slurmctld >/dev/null; then return 0; fi
    say "starting slurmctld on 127.0.0.1:$CTLD_PORT"
    /usr/sbin/slurmctld -f "$ETC/slurm.conf" || die "slurmctld did not start; see $LOG/slurmctld.log"
    wait_for 30 "slurmctld" pid_of slurmctld || die "slurmctld did not start; see $LOG/slurmctld.log"
    wait_for 30 "slurmctld to answer" scontrol ping || die "slurmctld does not answer; see $LOG/slurmctld.log"
}

node_idle() { sinfo -h -n "$NODE" -o %t | grep -Eq '^(idle|mix|alloc)'; }

start_slurmd() {
    if pid_of slurmd >/dev/null; then return 0; fi
    say "starting slurmd ($NODE) on 127.0.0.1:$SLURMD_PORT"
    /usr/sbin/slurmd -f "$ETC/slurm.conf" -N "$NODE" || die "slurmd did not start; see $LOG/slurmd.log"
    wait_for 30 "slurmd" pid_of slurmd || die "slurmd did not start; see $LOG/slurmd.log"
}

cmd_start() {
    need_root
    for b in munged mariadbd slurmdbd slurmctld slurmd sacctmgr sinfo; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] \
            || die "$b not found: run 'bash cluster/slurm_local.sh install' first"
    done
    if ! pid_of slurmctld >/dev/null && ! pid_of slurmd >/dev/null; then
        write_configs
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    if ! wait_for 60 "node $NODE to be idle" node_idle; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_for 30 "node $NODE to be idle" node_idle || die "node $NODE is not idle: $(sinfo -h -N -o '%N %t %E'); see $LOG/slurmd.log"
    fi
    say "up: partition '$PARTITION', node $NODE ($CPUS CPUs). Clients need:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
    need_root
    if pid_of slurmctld >/dev/null; then
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            # shellcheck disable=SC2016  # expanded by the inner bash
            wait_for 30 "jobs to end" bash -c '[ -z "$(squeue -h -o %A 2>/dev/null)" ]' || true
        fi
    fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid slurmdbd
    stop_pid mariadb
    stop_pid munged
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$ETC/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    say "stopped"
}

cmd_status() {
    local rc=0 pid
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if pid="$(pid_of "$name")"; then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s stopped\n' "$name"
            rc=3
        fi
    done
    if pid_of slurmctld >/dev/null; then
        sinfo || rc=3
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *)
        echo "usage: $0 install|start|stop|status|env" >&2
        exit 2
        ;;
esac
