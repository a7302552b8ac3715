#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started, by their PID files (nothing else is touched).
set -uo pipefail
STATE=${RLM_SLURM_DIR:-/tmp/rlm-slurm}
for name in slurmd slurmctld munged; do
  pidfile="$STATE/$name.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "slurm_down: stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
rm -f /run/munge/rlm-slurm-munged.pid  # munged's own copy (slurm_up.sh)
