#!/usr/bin/env bash
# A real SLURM (Debian's slurm-wlm + munge) on this one host: NODES slurmd daemons, each a SLURM node
# of CPUS CPUs, all on 127.0.0.1. For the tests (tests/test_slurm.py) and for trying a rendered
# sbatch script before taking it to a real cluster. Needs root (slurmd runs jobs as their user).
#
#   cluster/slurm/local-cluster.sh install            # apt-get install slurm-wlm munge, if missing
#   cluster/slurm/local-cluster.sh up DIR [NODES] [CPUS]
#   export SLURM_CONF=DIR/slurm.conf                  # every client (sbatch, squeue, ...) needs it
#   sbatch ...; squeue; scontrol show job ...
#   cluster/slurm/local-cluster.sh down DIR           # stops exactly the daemons `up` started
#
# Everything lives under DIR (config, munge key and socket, state, logs, pid files), so several
# such clusters and the host's own munge/slurm (if any) never mix. Ports: SLURM_LOCAL_PORT
# (default 17000) for slurmctld, +1.. for each slurmd. Run it in a private network namespace
# (`unshare --net`, as the tests do) to keep even those ports off every interface but loopback.
set -euo pipefail

usage() { sed -n '2,15p' "$0" >&2; exit 2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  # About 6 s on Debian 12 (9 packages); services are started by `up`, not by systemd.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local dir=$1 nodes=$2 cpus=$3 port=$4 host
  host=$(hostname -s)
  {
    echo "ClusterName=vdlocal"
    echo "SlurmctldHost=${host}(127.0.0.1)"
    echo "SlurmctldPort=${port}"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire=10: the default 120 s holds a requeued job back for about 140 s.
    echo "AuthInfo=socket=${dir}/munge/munge.socket,cred_expire=10"
    echo "StateSaveLocation=${dir}/state"
    echo "SlurmdSpoolDir=${dir}/spool/%n"
    echo "SlurmctldPidFile=${dir}/run/slurmctld.pid"
    echo "SlurmdPidFile=${dir}/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=${dir}/log/slurmctld.log"
    echo "SlurmdLogFile=${dir}/log/slurmd-%n.log"
    # No cgroups in a container: track job processes by parent pid, bind nothing.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "KillWait=5"
    # Schedule every 2 s (default 60): a requeued job starts soon after its hold ends.
    echo "SchedulerParameters=sched_interval=2,bf_interval=2"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    echo "SlurmdTimeout=60"
    for i in $(seq 1 "$nodes"); do
      echo "NodeName=vdnode${i} NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=${cpus} State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"${dir}/slurm.conf"
}

wait_for_nodes() {
  local dir=$1 nodes=$2 idle
  for _ in $(seq 1 60); do
    idle=$(SLURM_CONF="${dir}/slurm.conf" sinfo -h -t idle -o '%D' 2>/dev/null | head -n1 || true)
    if [ "${idle:-0}" = "$nodes" ]; then
      return 0
    fi
    sleep 0.5
  done
  echo "error: only ${idle:-0} of ${nodes} local SLURM nodes became idle within 30 s; logs in ${dir}/log" >&2
  return 1
}

up() {
  local dir nodes=${2:-2} cpus=${3:-1} port=${SLURM_LOCAL_PORT:-17000}
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  install_packages
  mkdir -p "${dir}/munge" "${dir}/state" "${dir}/run" "${dir}/log"
  # munged refuses a socket directory others can write and a key readable by others.
  chmod 0755 "${dir}/munge"
  if [ ! -f "${dir}/munge/munge.key" ]; then
    (umask 077 && dd if=/dev/urandom of="${dir}/munge/munge.key" bs=1024 count=1 status=none)
  fi
  write_config "$dir" "$nodes" "$cpus" "$port"
  munged --force --socket="${dir}/munge/munge.socket" --key-file="${dir}/munge/munge.key" \
    --pid-file="${dir}/run/munged.pid" --log-file="${dir}/log/munged.log" --seed-file="${dir}/munge/munged.seed"
  export SLURM_CONF="${dir}/slurm.conf"
  # Detached from this shell's session: `down` stops them by pid file, nothing else.
  setsid slurmctld -D -i -f "$SLURM_CONF" >>"${dir}/log/slurmctld.stdout" 2>&1 < /dev/null &
  echo $! >"${dir}/run/slurmctld.launcher.pid"
  for i in $(seq 1 "$nodes"); do
    mkdir -p "${dir}/spool/vdnode${i}"
    setsid slurmd -D -N "vdnode${i}" -f "$SLURM_CONF" >>"${dir}/log/slurmd-vdnode${i}.stdout" 2>&1 < /dev/null &
    echo $! >"${dir}/run/slurmd-vdnode${i}.launcher.pid"
  done
  wait_for_nodes "$dir" "$nodes"
  echo "local SLURM up: ${nodes} nodes x ${cpus} CPUs; export SLURM_CONF=${SLURM_CONF}"
}

down() {
  local dir=$1 pidfile pid
  [ -d "$dir/run" ] || return 0
  # The daemons' own pid files and the launchers' (the same process for -D): TERM, then KILL.
  for sig in TERM KILL; do
    for pidfile in "$dir"/run/*.pid; do
      [ -f "$pidfile" ] || continue
      pid=$(cat "$pidfile" 2>/dev/null || true)
      [ -n "$pid" ] && kill "-$sig" "$pid" 2>/dev/null || true
    done
    [ "$sig" = TERM ] && sleep 2
  done
  rm -f "$dir"/run/*.pid
}

case "${1:-}" in
  install) install_packages ;;
  up) [ $# -ge 2 ] || usage; up "${@:2}" ;;
  down) [ $# -eq 2 ] || usage; down "$2" ;;
  *) usage ;;
esac
