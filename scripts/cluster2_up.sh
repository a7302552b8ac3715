#!/usr/bin/env bash
# A real two-node Slurm on this machine (root only), for `make test-cluster`:
#   scripts/cluster2_up.sh     install slurm-wlm + munge if missing; a private bridge with one network
#                              namespace per node (its own address, hostname and hosts file); a private
#                              munged; slurmctld on the bridge and one slurmd per node; wait until both
#                              nodes are idle
#   scripts/cluster2_down.sh   stop all of it and remove the namespaces and the bridge
# It coexists with scripts/slurm_up.sh's one-node cluster: its own ports, munge key and socket, state
# dir and slurm.conf. Clients reach it only with SLURM_CONF=$STATE/etc/slurm.conf (printed at the end).
#
# The nodes are declared like a GPU cluster's (8 GPUs, many CPUs, much memory: RLM_CLUSTER2_GPUS,
# _CPUS, _MEM_MB) so that a GPU pipeline's requests are satisfiable unedited: the GPUs are a `gpu` GRES
# whose device files are nodes with /dev/null's numbers (Slurm allocates them and sets
# CUDA_VISIBLE_DEVICES; nothing computes on them) and slurmd takes the declared CPUs and memory over
# what it detects (SlurmdParameters=config_overrides). Like many clusters it sets no DefMemPerCPU or
# DefCpuPerGPU: a job gets what it asks for. Nodes have no route out; each has its own loopback.
# State under $RLM_CLUSTER2_DIR (default /tmp/rlm-cluster2). Exit 0: both nodes idle.
# Exit 3: it cannot run here (the one line on stderr says why).
set -euo pipefail
STATE=${RLM_CLUSTER2_DIR:-/tmp/rlm-cluster2}
NET=${RLM_CLUSTER2_NET:-10.203.0}          # /24: .1 the bridge (slurmctld), .11 and .12 the nodes
PREFIX=rlmc2                               # interface and namespace names (bridge, veths, netns)
NODES=(node1 node2)
GPUS=${RLM_CLUSTER2_GPUS:-8}
CPUS=${RLM_CLUSTER2_CPUS:-112}
MEM_MB=${RLM_CLUSTER2_MEM_MB:-1900000}
CTLD_PORT=16817
SLURMD_PORT=16818
CONF=$STATE/etc/slurm.conf
BRIDGE=${PREFIX}br0

cannot() { echo "cluster2_up: cannot start the two-node Slurm here: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || cannot "needs root (network namespaces, a bridge, slurmd); run as root"
for tool in ip nsenter unshare; do
  command -v "$tool" >/dev/null || cannot "$tool is not installed (iproute2, util-linux)"
done
NAME=cluster2_up
# shellcheck source=scripts/slurm_install.sh
source "$(dirname "$0")/slurm_install.sh"
install_slurm_if_missing
# CAP_NET_ADMIN and CAP_SYS_ADMIN: a throwaway namespace pair proves both before anything is made.
unshare --net --mount --uts true 2>/dev/null \
  || cannot "no CAP_NET_ADMIN/CAP_SYS_ADMIN (unshare --net --mount --uts failed), e.g. an unprivileged container"

running() { [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$(cat "$1")/stat" 2>/dev/null; }
if running "$STATE/slurmctld.pid"; then
  cannot "a two-node cluster from $STATE is already running; stop it first: scripts/cluster2_down.sh"
fi
# Leftovers of a run that died before its teardown: clear them, so this start is clean.
bash "$(dirname "$0")/cluster2_down.sh" >/dev/null 2>&1 || true

rm -rf "$STATE/ctld"  # a fresh controller: no jobs or node states from an earlier run
mkdir -p "$STATE"/{etc,log,ctld,munge,d}
chmod 0755 "$STATE" "$STATE/etc"

# ---- network: a bridge in this namespace, a veth pair per node namespace; no route out of the nodes
ip link add "$BRIDGE" type bridge 2>/dev/null || cannot "cannot create a bridge ($BRIDGE): no CAP_NET_ADMIN or no bridge support"
ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
HOSTS=$STATE/etc/hosts
{
  echo "127.0.0.1 localhost"
  echo "$NET.1 $(hostname -s)"
  for i in "${!NODES[@]}"; do echo "$NET.$((11 + i)) ${NODES[$i]}"; done
} >"$HOSTS"
for i in "${!NODES[@]}"; do
  node=${NODES[$i]} ns=$PREFIX-${NODES[$i]} veth=$PREFIX-n$((i + 1))
  ip netns add "$ns" || cannot "ip netns add $ns failed"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" addr add "$NET.$((11 + i))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up   # a node's own 127.0.0.1 (servers a job starts for itself)
done

# ---- munge: our own daemon, key and socket (the system's, if any, is left alone)
KEY=$STATE/munge/munge.key
SOCKET=$STATE/munge/munge.socket
dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
chown -R munge:munge "$STATE/munge"
chmod 0755 "$STATE/munge"   # clients need to reach the socket; the key itself is 0400
chmod 0400 "$KEY"
runuser -u munge -- munged --key-file="$KEY" --socket="$SOCKET" --pid-file="$STATE/munge/munged.pid" \
  --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" >/dev/null 2>&1 \
  || cannot "munged did not start (see $STATE/munge/munged.log)"
cp "$STATE/munge/munged.pid" "$STATE/munged.pid"
for _ in $(seq 50); do munge -S "$SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 && break; sleep 0.1; done

# ---- slurm.conf + gres.conf (gres.conf is read from slurm.conf's directory)
NODELIST=$(IFS=,; echo "${NODES[*]}")
{
  cat <<EOF
# written by rlm-train scripts/cluster2_up.sh: two nodes in network namespaces, for tests
ClusterName=rlmcluster2
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=$NET.$((11 + i)) NodeHostname=${NODES[$i]} CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"
  done
  echo "PartitionName=gpu Nodes=$NODELIST Default=YES MaxTime=2-00:00:00 State=UP"
} >"$CONF"
# Slurm 22.05 drops a GPU GRES that names no File and wants character devices, so each fake GPU is a
# device node with /dev/null's numbers: Slurm counts and allocates them and sets CUDA_VISIBLE_DEVICES
# from their indices as on a GPU node; nothing can compute on one.
rm -rf "$STATE/dev"
mkdir -p "$STATE/dev"
for g in $(seq 0 $((GPUS - 1))); do
  mknod "$STATE/dev/fakegpu$g" c 1 3 2>/dev/null || cannot "mknod failed (no CAP_MKNOD): the fake GPUs need device nodes"
done
cat >"$STATE/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODELIST Name=gpu File=$STATE/dev/fakegpu[0-$((GPUS - 1))]
EOF

# ---- daemons: slurmctld here (listening on the bridge), one slurmd inside each node's namespaces
SLURM_CONF=$CONF slurmctld -i -f "$CONF" >/dev/null 2>&1 \
  || cannot "slurmctld did not start (see $STATE/log/slurmctld.log)"
for i in "${!NODES[@]}"; do
  node=${NODES[$i]}
  mkdir -p "$STATE/d/$node"
  # Not `ip netns exec`: it remounts /sys, which hides the cgroup tree slurmd 22.05 insists on.
  nsenter --net="/run/netns/$PREFIX-$node" unshare --uts --mount --propagation private \
    env SLURM_CONF="$CONF" bash -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -f "$3" -N "$2"' \
    _ "$HOSTS" "$node" "$CONF" \
    >/dev/null 2>&1 || cannot "slurmd of $node did not start (see $STATE/log/slurmd.$node.log)"
done

state=""
for _ in $(seq 150); do
  state=$(SLURM_CONF=$CONF sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  idle=$(grep -cE '=(idle|mixed|allocated)' <<<"${state// /$'\n'}" || true)
  if [ "$idle" -eq "${#NODES[@]}" ]; then
    echo "cluster2_up: nodes ${state% } (each: $GPUS GPUs as a GRES, $CPUS CPUs, $MEM_MB MB declared), state in $STATE"
    echo "cluster2_up: use it with SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.2
done
cannot "the nodes did not come up (sinfo: ${state:-no answer}); see $STATE/log/"
