#!/usr/bin/env bash
# Stop what scripts/cluster2_up.sh started and remove what it made: every process inside the node
# namespaces (slurmd, job steps, servers the jobs started), slurmctld and munged by their PID files,
# the namespaces, the bridge, and /run/netns's mount once no namespace is left. Safe to run twice.
set -uo pipefail
STATE=${RLM_CLUSTER2_DIR:-/tmp/rlm-cluster2}
PREFIX=rlmc2
NODES=(node1 node2)

# A stopped process can linger as a zombie until PID 1 reaps it: that counts as gone.
alive() { [ -d "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

stop_pids() {  # WHAT PID...: TERM, up to 5 s, then KILL
  local what=$1 pid left
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  for _ in $(seq 50); do
    left=()
    for pid in "$@"; do alive "$pid" && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.1
  done
  [ ${#left[@]} -gt 0 ] && kill -KILL "${left[@]}" 2>/dev/null
  echo "cluster2_down: stopped $what ($*)"
}

for node in "${NODES[@]}"; do
  ns=$PREFIX-$node
  [ -e "/run/netns/$ns" ] || continue
  mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
  stop_pids "the processes of $node" "${pids[@]}"
done
for name in slurmctld munged; do
  pidfile=$STATE/$name.pid
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if alive "$pid"; then stop_pids "$name" "$pid"; fi
  rm -f "$pidfile"
done
rm -f "$STATE"/slurmd.*.pid "$STATE/munge/munged.pid"
for i in "${!NODES[@]}"; do
  # The root end of each veth pair first: a namespace lingers (and keeps its end) while a zombie holds it.
  ip link show "$PREFIX-n$((i + 1))" >/dev/null 2>&1 && ip link del "$PREFIX-n$((i + 1))"
  [ -e "/run/netns/$PREFIX-${NODES[$i]}" ] && ip netns del "$PREFIX-${NODES[$i]}"
done
ip link show "${PREFIX}br0" >/dev/null 2>&1 && ip link del "${PREFIX}br0"
# `ip netns add` mounted /run/netns on itself; leave it only while other namespaces use it.
if mountpoint -q /run/netns 2>/dev/null && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
  umount /run/netns && rmdir /run/netns 2>/dev/null
fi
exit 0
