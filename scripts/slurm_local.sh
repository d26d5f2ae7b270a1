#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, with run accounting, for the tests (and for
# trying the SLURM launchers by hand). Debian's packages: slurm-wlm slurmdbd munge mariadb-server.
#
#   scripts/slurm_local.sh start    (re)start it; prints "SLURM: one-node cluster up (...)"
#   scripts/slurm_local.sh stop     cancel the jobs, then stop every daemon
#   scripts/slurm_local.sh status   sinfo and squeue
#
# Everything (configs, keys, database, spool, logs) lives in one state folder, ENGINE_SLURM_DIR
# (default /tmp/engine-slurm). Its own munged, MariaDB, slurmdbd, slurmctld and slurmd run on
# 127.0.0.1 with free ports picked at start. Clients find the cluster through SLURM_CONF
# (`source <state>/env.sh`) and, while it runs, through /etc/slurm/slurm.conf: a symlink to its
# slurm.conf, made only where there was no real one (the one change outside the state folder).
# Must run as root: slurmctld and slurmd run as root (SlurmUser=root), munged as munge and
# MariaDB as mysql.
set -euo pipefail

STATE=${ENGINE_SLURM_DIR:-/tmp/engine-slurm}
CONF=$STATE/slurm.conf
MARK=$STATE/.engine-slurm # proof that a folder is ours to wipe at the next start
SYSCONF=/etc/slurm/slurm.conf
CLUSTER=engine
ACCOUNT=engine
PARTITION=cpu
export SLURM_CONF=$CONF

say() { echo "SLURM: $*"; }

# Why it failed, and the log that says more, on stderr; then take down what did start.
fail() {
  local reason=$1 log=${2:-}
  {
    echo "SLURM: not started: $reason"
    if [ -n "$log" ] && [ -s "$log" ]; then
      echo "--- last lines of $log"
      tail -n 25 "$log"
    fi
  } >&2
  if [ -e "$MARK" ]; then stop_daemons >/dev/null 2>&1 || true; fi
  exit 1
}

# Poll a command, 10 times a second, until it succeeds or $1 seconds have passed. Each try gets
# at most 10 s: a SLURM client that cannot reach its daemon retries for much longer.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  while :; do
    if timeout 10 "$@" >/dev/null 2>&1; then return 0; fi
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# A pid file's process, only while it still runs the program we started (pids are reused).
live_pid() {
  local pidfile=$1 program=$2 pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = "$program" ] || return 1
  echo "$pid"
}

# TERM, up to 15 s to exit, then KILL; and forget the pid file.
stop_pid() {
  local pidfile=$1 program=$2 pid
  if pid=$(live_pid "$pidfile" "$program"); then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 15 bash -c "! kill -0 $pid"; then
      echo "SLURM: $program (pid $pid) ignored SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

free_ports() {
  # Hold all sockets open together so that the four ports differ.
  python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
'
}

# The order matters: jobs first (their steps report to slurmd and slurmctld), slurmdbd after
# slurmctld (which sends it the last job records), the database after slurmdbd, munge last.
stop_daemons() {
  if live_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    local jobs
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    # shellcheck disable=SC2086  # one argument per job id
    if [ -n "$jobs" ]; then timeout 10 scancel --quiet $jobs 2>/dev/null || true; fi
    # shellcheck disable=SC2016  # the inner bash expands it, at every try
    if ! wait_until 20 bash -c '[ -z "$(squeue -h -o %i 2>/dev/null)" ]'; then
      echo "SLURM: jobs still in the queue after 20 s; stopping anyway" >&2
    fi
  fi
  stop_pid "$STATE/run/slurmd.pid" slurmd
  stop_pid "$STATE/run/slurmctld.pid" slurmctld
  stop_pid "$STATE/run/slurmdbd.pid" slurmdbd
  stop_pid "$STATE/mysql/mysqld.pid" mariadbd
  stop_pid "$STATE/munge/munged.pid" munged
  # The system-wide pointer goes with the cluster it points to.
  if [ -L "$SYSCONF" ] && [ "$(readlink "$SYSCONF")" = "$CONF" ]; then rm -f "$SYSCONF"; fi
}

write_configs() {
  local ctld_port=$1 slurmd_port=$2 dbd_port=$3 db_port=$4 db_pass=$5 host node first_job_id
  host=$(hostname -s)
  # The clock in seconds: ahead of the previous cluster's ids unless it ran a job a second. It
  # wraps every 19 months, below SLURM's largest job id (67 million).
  first_job_id=$(($(date +%s) % 50000000 + 1))
  # slurmd -C describes this machine (CPUs, sockets, cores, memory) in slurm.conf's own syntax.
  node=$(slurmd -C | grep '^NodeName=')
  cat >"$CONF" <<CONF
# Written by scripts/slurm_local.sh start: a one-node cluster, all in $STATE.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
# Our own munged. cred_expire is also how long a requeued job waits before it runs again
# (120 s by default, too slow for tests).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=10
# Connections to slurmdbd take their munge socket from here, not from AuthInfo.
AccountingStoragePass=$STATE/munge/munge.socket.2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers rarely allow them): processes are tracked by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
# Run accounting (sacct, and so submitit's job states) through slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start a submitted job at once (batch jobs wait up to 3 s by default), and look at the queue
# every 2 s (60 s by default): a requeued job becomes eligible with no event to wake the scheduler.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
# No mail on this machine (slurmctld logs an error for a missing mailer).
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# A node that was down comes back by itself when its slurmd registers.
ReturnToService=2
# SIGTERM, then SIGKILL 5 s later, on scancel and time-outs; batch jobs can be requeued.
KillWait=5
JobRequeue=1
# Finished jobs leave squeue after 10 s (sacct keeps them).
MinJobAge=10
# Job ids go on rising across restarts (each start wipes the state), so that an id a client
# still holds from the previous cluster (submitit caches states by id) never names a new job.
FirstJobId=$first_job_id
SlurmdTimeout=60
SlurmctldTimeout=30
InactiveLimit=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

  # slurmdbd finds this next to SLURM_CONF; it holds the database password, so root only.
  cat >"$STATE/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$STATE/slurmdbd.conf"

  # A private MariaDB: no /etc/mysql, TCP on 127.0.0.1 only.
  cat >"$STATE/my.cnf" <<CONF
[mariadbd]
datadir=$STATE/mysql
socket=$STATE/mysql/mysqld.sock
pid-file=$STATE/mysql/mysqld.pid
log-error=$STATE/log/mariadb.log
port=$db_port
bind-address=127.0.0.1
skip-name-resolve
# A throwaway database: no fsync (slow in containers), which makes creating slurmdbd's tables
# several times faster. Sizes kept small; slurmdbd only logs that it would like more.
innodb_flush_method=nosync
innodb_flush_log_at_trx_commit=0
innodb_doublewrite=0
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
innodb_lock_wait_timeout=900
CONF
}

start_munge() {
  install -d -o munge -g munge -m 755 "$STATE/munge"
  su -s /bin/sh munge -c "mungekey --create --keyfile=$STATE/munge/munge.key" \
    >>"$STATE/log/munged.log" 2>&1 || fail "mungekey --create failed" "$STATE/log/munged.log"
  touch "$STATE/log/munged.log"
  chown munge "$STATE/log/munged.log"
  su -s /bin/sh munge -c "munged --key-file=$STATE/munge/munge.key \
      --socket=$STATE/munge/munge.socket.2 --pid-file=$STATE/munge/munged.pid \
      --seed-file=$STATE/munge/munged.seed --log-file=$STATE/log/munged.log" \
    </dev/null >>"$STATE/log/munged.log" 2>&1 || fail "munged did not start" "$STATE/log/munged.log"
  wait_until 5 munge -S "$STATE/munge/munge.socket.2" -n ||
    fail "munged does not answer" "$STATE/log/munged.log"
}

start_mariadb() {
  local db_pass=$1 sql
  install -d -o mysql -g mysql -m 700 "$STATE/mysql"
  touch "$STATE/log/mariadb.log"
  chown mysql "$STATE/log/mariadb.log"
  mariadb-install-db --defaults-file="$STATE/my.cnf" --user=mysql --skip-test-db \
    --auth-root-authentication-method=socket >>"$STATE/log/mariadb.log" 2>&1 ||
    fail "mariadb-install-db failed" "$STATE/log/mariadb.log"
  # mariadbd stays in the foreground: setsid detaches it from the caller's session and terminal.
  setsid mariadbd --defaults-file="$STATE/my.cnf" --user=mysql </dev/null \
    >>"$STATE/log/mariadb.log" 2>&1 &
  wait_until 30 mariadb-admin --socket="$STATE/mysql/mysqld.sock" -u root ping ||
    fail "MariaDB does not answer" "$STATE/log/mariadb.log"
  # The password goes through standard input, not a command line that ps shows.
  sql="CREATE DATABASE slurm_acct_db;
       CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  echo "$sql" | mariadb --socket="$STATE/mysql/mysqld.sock" -u root >>"$STATE/log/mariadb.log" 2>&1 ||
    fail "could not create the accounting database" "$STATE/log/mariadb.log"
}

start_slurmdbd() {
  # slurmdbd has no -f: it reads slurmdbd.conf from SLURM_CONF's folder.
  slurmdbd </dev/null >>"$STATE/log/slurmdbd.log" 2>&1 || fail "slurmdbd did not start" "$STATE/log/slurmdbd.log"
  # It creates its tables before it answers.
  wait_until 60 sacctmgr -n list cluster ||
    fail "slurmdbd does not answer sacctmgr" "$STATE/log/slurmdbd.log"
  # The cluster, an account, and the user who runs the tests (root) in it.
  # One sacctmgr reading its commands from standard input: each start of it costs a second.
  sacctmgr -i >>"$STATE/log/sacctmgr.log" 2>&1 <<CMDS || fail "sacctmgr could not register the cluster" "$STATE/log/sacctmgr.log"
add cluster $CLUSTER
add account $ACCOUNT Description="engine tests" Organization=engine
add user $(id -un) Account=$ACCOUNT
CMDS
  timeout 10 sacctmgr -n -P list associations cluster="$CLUSTER" user="$(id -un)" account="$ACCOUNT" format=User 2>/dev/null |
    grep -q . || fail "sacctmgr could not register the cluster" "$STATE/log/sacctmgr.log"
}

start_slurm() {
  slurmctld -f "$CONF" </dev/null >>"$STATE/log/slurmctld.log" 2>&1 ||
    fail "slurmctld did not start" "$STATE/log/slurmctld.log"
  slurmd -f "$CONF" </dev/null >>"$STATE/log/slurmd.log" 2>&1 ||
    fail "slurmd did not start" "$STATE/log/slurmd.log"
  wait_until 30 bash -c "sinfo -h -o %T | grep -qx idle" ||
    fail "the node is not idle after 30 s ($(sinfo -h -o '%T %E' 2>&1 | head -1))" "$STATE/log/slurmctld.log"
  # A trivial job must reach COMPLETED in sacct: that proves slurmd runs jobs and accounting works.
  local job
  job=$(sbatch --parsable --wrap true -o /dev/null 2>&1) || fail "sbatch failed: $job" "$STATE/log/slurmctld.log"
  wait_until 30 bash -c "sacct -n -X -j $job -o State | grep -q COMPLETED" ||
    fail "the probe job $job did not reach COMPLETED in sacct ($(sacct -n -X -j "$job" -o State 2>&1 | head -1))" \
      "$STATE/log/slurmd.log"
}

# Processes that do not get SLURM_CONF (a test's subprocess with a clean env, a shell opened
# later) still find this cluster through the default path. A real slurm.conf someone else put
# there is left alone, and so is a link to another running cluster of this script; a link that
# points nowhere or to a stopped cluster is replaced.
link_sysconf() {
  local other
  if [ -L "$SYSCONF" ]; then
    other=$(dirname "$(readlink "$SYSCONF")")
    if [ -e "$SYSCONF" ] && [ "$other" != "$STATE" ] &&
      { [ ! -e "$other/.engine-slurm" ] || live_pid "$other/run/slurmctld.pid" slurmctld >/dev/null; }; then
      return 0
    fi
  elif [ -e "$SYSCONF" ]; then
    return 0
  fi
  mkdir -p "$(dirname "$SYSCONF")"
  ln -sfn "$CONF" "$SYSCONF"
}

start() {
  [ "$(id -u)" = 0 ] || fail "must run as root (slurmctld and slurmd run as root)"
  for cmd in slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db python3; do
    command -v "$cmd" >/dev/null || fail "$cmd is missing (apt-get install slurm-wlm slurmdbd munge mariadb-server)"
  done
  if [ -e "$STATE" ] && [ ! -e "$MARK" ] && [ -n "$(ls -A "$STATE")" ]; then
    fail "$STATE is not empty and was not made by this script"
  fi
  # Idempotent: a previous cluster in this folder stops, and every trace of it goes.
  if [ -e "$MARK" ]; then
    stop_daemons
    find "$STATE" -mindepth 1 -delete
  fi
  install -d -m 755 "$STATE" "$STATE/run" "$STATE/log" "$STATE/ctld" "$STATE/slurmd"
  touch "$MARK"

  local ports db_pass
  read -r -a ports <<<"$(free_ports)"
  db_pass=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  write_configs "${ports[@]}" "$db_pass"
  start_munge
  start_mariadb "$db_pass"
  start_slurmdbd
  start_slurm

  echo "export SLURM_CONF=$CONF" >"$STATE/env.sh"
  link_sysconf
  local node cpus
  node=$(sinfo -h -N -o %N | head -1)
  cpus=$(sinfo -h -N -o %c | head -1)
  say "one-node cluster up ($node, $cpus CPUs, accounting on)"
}

stop() {
  if [ ! -e "$MARK" ]; then
    say "nothing to stop in $STATE"
    return 0
  fi
  stop_daemons
  say "stopped (state kept in $STATE until the next start)"
}

status() {
  if ! live_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    say "not running (state folder $STATE)"
    return 1
  fi
  echo "SLURM_CONF=$CONF"
  sinfo
  squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status   (state in \${ENGINE_SLURM_DIR:-/tmp/engine-slurm})" >&2
    exit 2
    ;;
esac
