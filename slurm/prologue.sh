# ---- common to every stage script (slurm/prologue.sh); this script: slurm/{{TEMPLATE}} ----
set -euo pipefail
cd {{WORKDIR}}
# The project's venv first on PATH (rlm-train, accelerate, vllm): nothing to activate.
export PATH={{VENV_BIN}}:"$PATH"
export PYTHONUNBUFFERED=1
PY={{PYTHON}}
# The launch state: the scripts, logs/ and exit/ (rlm-train launch creates them before sbatch).
STATE={{STATE_DIR}}
TASK=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
{{ENV}}
# srun steps do not inherit sbatch's --cpus-per-task (Slurm >= 22.05): each passes this.
STEP_CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
# torchrun (under accelerate launch) gives its ranks this long to save after it passes them a TERM.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={{SHUTDOWN_S}}
SERVER_PIDS=()
JOB_SECRETS=()  # files only this job may read (a server's token): removed when it ends
MAIN_PID=''  # the stage's command while run_stage waits for it
TERMS=0
finish() {  # stop the stage's command and this job's servers, remove its secrets, record the exit status for `rlm-train launch --status`
  local code=$? pid
  if [ -n "$MAIN_PID" ]; then kill -TERM "$MAIN_PID" 2>/dev/null || true; wait "$MAIN_PID" 2>/dev/null || true; fi
  for pid in "${SERVER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${SERVER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ ${#JOB_SECRETS[@]} -gt 0 ]; then rm -f -- "${JOB_SECRETS[@]}"; fi
  echo "$code" >"$STATE/exit/{{STAGE}}.$TASK"
}
on_term() {  # the time limit's early signal, scancel, or the limit itself
  local job_state
  TERMS=$((TERMS + 1))
  [ -n "$MAIN_PID" ] || exit 143  # the stage's command has not started: nothing to save
  [ "$TERMS" -eq 1 ] || return 0
  # The early signal (--signal=B:TERM@N) reaches this script alone, while the job is RUNNING: pass it on.
  # scancel and the limit signal every process of a job that is ending: the command has its TERM (a
  # second one would mean "stop at once" to it).
  job_state=$(timeout 10 squeue -h -j "$TASK" -o %T 2>/dev/null | head -n 1 || true)  # JOB_TASK: this array task alone
  if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "$job_state" ] && [ "$job_state" != RUNNING ]; then
    echo "stage {{STAGE}}: SIGTERM at $(date -u +%FT%TZ), the job $job_state: waiting for the stage's command to stop"
    return 0
  fi
  echo "stage {{STAGE}}: SIGTERM at $(date -u +%FT%TZ): passed to the stage's command (pid $MAIN_PID); waiting for it to save and stop"
  kill -TERM "$MAIN_PID" 2>/dev/null || true
}
trap finish EXIT
trap on_term TERM
rlm() { "$PY" -m rlm_train.cli "$@"; }
run_stage() {  # COMMAND ARGS...: the stage's command in the background, so a TERM reaches it at once; its exit status
  if [ "$1" = rlm ]; then set -- "$PY" -m rlm_train.cli "${@:2}"; fi  # the program itself, not a subshell, owns the pid
  "$@" &
  MAIN_PID=$!
  local code seen
  while :; do
    seen=$TERMS code=0
    wait "$MAIN_PID" || code=$?
    [ "$TERMS" -ne "$seen" ] || break  # a TERM only interrupted the wait: wait again for the command's own status
  done
  MAIN_PID=''
  return "$code"
}
gpu_slice() {  # START COUNT: that slice of the GPUs Slurm gave this job, as a CUDA_VISIBLE_DEVICES list
  local all
  IFS=, read -ra all <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $(($1 + $2 - 1)))}"
  (IFS=,; echo "${all[*]:$1:$2}")
}
wait_health() {  # URL TIMEOUT_S PID: until the server answers, or fail when it dies first
  "$PY" - "$1" "$2" "${3:-0}" <<'PYEOF'
import os, sys, time, urllib.request
url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if pid and not os.path.exists(f"/proc/{pid}"):
        sys.exit(f"the server (pid {pid}) exited before {url} answered; see its log in the state dir")
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            if reply.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(f"no answer from {url} within {timeout:.0f} s")
PYEOF
}
start_servers() {  # RECIPE|PORT|GPUS ...: each `rlm-train serve` on its own slice of the GPUs, then wait for all
  local spec recipe port gpus offset=0 i ports=()
  for spec in "$@"; do
    IFS='|' read -r recipe port gpus <<<"$spec"
    if [ "$gpus" -gt 0 ]; then
      CUDA_VISIBLE_DEVICES=$(gpu_slice "$offset" "$gpus") "$PY" -m rlm_train.cli serve --recipe "$recipe" \
        >"$STATE/logs/{{STAGE}}-server-$port.$TASK.log" 2>&1 &
      offset=$((offset + gpus))
    else
      "$PY" -m rlm_train.cli serve --recipe "$recipe" >"$STATE/logs/{{STAGE}}-server-$port.$TASK.log" 2>&1 &
    fi
    SERVER_PIDS+=($!)
    ports+=("$port")
  done
  for i in "${!ports[@]}"; do
    wait_health "http://127.0.0.1:${ports[$i]}/health" {{SERVER_TIMEOUT_S}} "${SERVER_PIDS[$i]}"
  done
  if [ "$offset" -gt 0 ] && [ {{OWN_GPUS}} -gt 0 ]; then
    CUDA_VISIBLE_DEVICES=$(gpu_slice "$offset" {{OWN_GPUS}})  # the stage's own work: the GPUs after the servers'
    export CUDA_VISIBLE_DEVICES
  fi
}
echo "stage {{STAGE}} of {{PIPELINE}}: job $TASK on $(hostname) at $(date -u +%FT%TZ)"
SERVERS=({{SERVERS}})  # the servers this stage talks to on 127.0.0.1 (pipeline `background` serve stages)
if [ ${#SERVERS[@]} -gt 0 ]; then start_servers "${SERVERS[@]}"; fi
# ---- end of the common part ----
