#!/usr/bin/env bash
# A real Slurm cluster on this one machine for the launch tests: one controller and two slurmd
# "nodes" (n1, n2) on 127.0.0.1 (see shared/notes/slurm.md). Installs Slurm and munge from Debian
# when missing. Stops only the daemons it started, by their pid files.
#   slurm_cluster.sh start | stop
set -euo pipefail
STATE=${PRIMUS_SLURM_STATE:-/tmp/primus-slurm}
HOST=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) / 4 ))
  mkdir -p "$STATE"/{ctld,n1,n2} /etc/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=primus-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=16817
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MailProg=/bin/true
SlurmUser=root
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/ctld/slurmctld.pid
SlurmctldLogFile=$STATE/ctld/slurmctld.log
SlurmdSpoolDir=$STATE/%n
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmdLogFile=$STATE/%n/slurmd.log
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17001 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17002 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start() {
  install
  start_munge
  stop_daemons
  write_conf
  slurmctld -i
  slurmd -N n1
  slurmd -N n2
  for _ in $(seq 100); do
    [ "$(sinfo -h -N -t idle 2>/dev/null | wc -l)" -ge 2 ] && { echo "slurm up: n1 n2"; return 0; }
    sleep 0.2
  done
  echo "slurm did not come up" >&2; sinfo -N >&2 || true; return 1
}

stop_daemons() {
  for pidfile in "$STATE"/n1/slurmd.pid "$STATE"/n2/slurmd.pid "$STATE"/ctld/slurmctld.pid; do
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
  sleep 0.3
}

case "${1:-}" in
  start) start ;;
  stop) stop_daemons ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
