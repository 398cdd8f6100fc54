#!/usr/bin/env bash
# A one-node SLURM for the tests marked slurm: munge, MariaDB, slurmdbd (accounting), slurmctld and slurmd, all from
# Debian's packages, run as root without systemd or cgroups.
#
#   scripts/slurm_cluster.sh start    # prints the line to eval: export SLURM_CONF=...
#   scripts/slurm_cluster.sh status
#   scripts/slurm_cluster.sh stop
#
# Configuration, state and logs live under $XCIT_SLURM_DIR (default /tmp/xcit-slurm); each daemon is stopped by its
# own pid file. start is idempotent: daemons already running are left alone. Without root or without the packages
# (apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server) it says so and exits 3.
#
# Settings that make a requeue cycle take seconds instead of minutes (SLURM 22.05 defaults in brackets):
#   AuthInfo cred_expire=10 [120]: a requeued job may only start again once its launch credential has expired;
#   SchedulerParameters sched_interval=2,bf_interval=2 [60, 30]: how often the scheduler looks at pending jobs;
#   KillWait=5 [30]: seconds between SIGTERM and SIGKILL when a job is requeued, cancelled or preempted.
# Accounting (slurmdbd + MariaDB) makes sacct work: without it submitit cannot see that a job has died.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which a non-login shell may lack

DIR=${XCIT_SLURM_DIR:-/tmp/xcit-slurm}
HOST=$(hostname -s)
CTLD_PORT=${XCIT_SLURM_PORT:-16817}  # away from SLURM's defaults (6817-6819), so a real installation is untouched
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 3))
CPUS=${XCIT_SLURM_CPUS:-4}  # more task slots than cores: two 2-task test jobs can run side by side
MUNGE_SOCKET=$DIR/munge-run/munge.socket.2

log() { echo "slurm_cluster: $*" >&2; }

running() {  # running NAME: the daemon's pid file names a live process
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND (a program: 10 s at most each) for SECONDS
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  while [ "$SECONDS" -lt "$deadline" ]; do
    timeout 10 "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "$what did not come up within ${secs} s; see $DIR/log"
  return 1
}

check_prerequisites() {
  if [ "$(id -u)" != 0 ]; then
    log "needs root (the daemons run as root without systemd)"
    exit 3
  fi
  local missing=""
  for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacctmgr; do
    command -v "$cmd" >/dev/null || missing="$missing $cmd"
  done
  if [ -n "$missing" ]; then
    log "not installed:$missing (apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server)"
    exit 3
  fi
}

write_config() {
  mkdir -p "$DIR"/{run,log,state,spool,mysql,munge-run}
  install -d -m 700 "$DIR/munge-etc"
  chmod 755 "$DIR/munge-run"
  [ -s "$DIR/munge-etc/munge.key" ] || dd if=/dev/urandom of="$DIR/munge-etc/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge-etc/munge.key"
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=xcit
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=600
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a config that others can read
}

start_munge() {
  running munged && return
  munged --force --key-file="$DIR/munge-etc/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge-etc/munged.seed"
  wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n
}

start_mariadb() {
  running mariadbd && return
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
      --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
  fi
  # mariadbd does not daemonise itself: it runs in the background, its own pid file names it
  setsid mariadbd --user=root --datadir="$DIR/mysql" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$DIR/run/mysqld.sock" --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --innodb-buffer-pool-size=32M --skip-name-resolve </dev/null >/dev/null 2>&1 &
  wait_for 120 mariadbd mariadb --protocol=tcp -h 127.0.0.1 -P "$DB_PORT" -u root -e "select 1"
}

start_slurmdbd() {
  running slurmdbd && return
  SLURM_CONF=$DIR/slurm.conf slurmdbd  # reads slurmdbd.conf beside SLURM_CONF
  wait_for 60 slurmdbd env SLURM_CONF="$DIR/slurm.conf" sacctmgr -n list cluster
  if ! SLURM_CONF=$DIR/slurm.conf sacctmgr -n -P list cluster format=cluster | grep -qx xcit; then
    SLURM_CONF=$DIR/slurm.conf sacctmgr -i add cluster xcit >/dev/null
  fi
}

start_slurm() {
  export SLURM_CONF=$DIR/slurm.conf
  running slurmctld || slurmctld -f "$SLURM_CONF"
  wait_for 30 slurmctld scontrol ping
  running slurmd || slurmd -f "$SLURM_CONF"
  wait_for 60 "the node" sh -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

stop_daemon() {  # stop_daemon NAME: SIGTERM, then SIGKILL after 15 s
  local pid
  pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 75); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$DIR/run/$1.pid"
}

case "${1:-}" in
  start)
    check_prerequisites
    write_config
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    echo "export SLURM_CONF=$DIR/slurm.conf"
    ;;
  stop)
    for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_daemon "$d"; done
    ;;
  status)
    rc=0
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
      if running "$d"; then echo "$d running (pid $(cat "$DIR/run/$d.pid"))"; else echo "$d stopped"; rc=1; fi
    done
    [ "$rc" = 0 ] && SLURM_CONF=$DIR/slurm.conf sinfo -N -l
    echo "export SLURM_CONF=$DIR/slurm.conf"
    exit "$rc"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
