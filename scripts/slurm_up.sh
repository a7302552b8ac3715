#!/usr/bin/env bash
# A real one-node Slurm on this machine (root only), for `make test-slurm`:
#   scripts/slurm_up.sh      install slurm-wlm + munge if missing, write a one-node slurm.conf,
#                            start munged, slurmctld and slurmd; wait until the node is idle
#   scripts/slurm_down.sh    stop exactly the daemons this script started (by their PID files)
# State (PID files, logs, spool) lives under $RLM_SLURM_DIR (default /tmp/rlm-slurm).
# Exit 0: Slurm is up. Exit 3: it cannot run here (the one line on stderr says why).
set -euo pipefail
STATE=${RLM_SLURM_DIR:-/tmp/rlm-slurm}
CONF=/etc/slurm/slurm.conf

cannot() { echo "slurm_up: cannot start Slurm here: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || cannot "needs root (slurmd runs jobs as their users); run as root"
NAME=slurm_up
# shellcheck source=scripts/slurm_install.sh
source "$(dirname "$0")/slurm_install.sh"
install_slurm_if_missing

mkdir -p "$STATE"/{log,ctld,d} /etc/slurm /etc/munge /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge
chmod 0700 /etc/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munged: reuse one that answers, else start ours; $STATE/munged.pid marks it as ours. munged runs as
# munge, which cannot write into $STATE: it writes its PID file into /run/munge, and we copy it.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  MUNGE_PID=/run/munge/rlm-slurm-munged.pid
  rm -f "$MUNGE_PID"
  runuser -u munge -- munged --pid-file="$MUNGE_PID" >/dev/null 2>&1 \
    || cannot "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do [ -s "$MUNGE_PID" ] && break; sleep 0.1; done
  [ -s "$MUNGE_PID" ] || cannot "munged wrote no PID file ($MUNGE_PID)"
  cp "$MUNGE_PID" "$STATE/munged.pid"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))
if ! running "$STATE/slurmctld.pid" || ! running "$STATE/slurmd.pid"; then
  cat >"$CONF" <<EOF
# written by rlm-train scripts/slurm_up.sh: one node, for tests
ClusterName=rlmtest
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  running "$STATE/slurmctld.pid" || slurmctld -i >/dev/null 2>&1 \
    || cannot "slurmctld did not start (see $STATE/log/slurmctld.log)"
  running "$STATE/slurmd.pid" || slurmd >/dev/null 2>&1 \
    || cannot "slurmd did not start (see $STATE/log/slurmd.log)"
fi

for _ in $(seq 150); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle*|mixed*|allocated*) echo "slurm_up: node $NODE $state ($CPUS CPUs, ${MEM_MB} MB), state in $STATE"; exit 0 ;;
  esac
  sleep 0.2
done
cannot "the node did not come up (sinfo: ${state:-no answer}); see $STATE/log/"
