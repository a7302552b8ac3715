"""`rlm-train launch --status RUN`: each stage's jobs, their exit codes, logs and outputs.

A job's state comes from Slurm (squeue, then sacct or scontrol) and from the exit record the
script itself writes (OUT/pipeline/slurm/exit/STAGE.JOB[_TASK]), which outlives the
controller's memory of ended jobs. A stage that never ran because one it waits for failed,
timed out or was cancelled says so, naming that stage. `rlm-train launch --resume`
(launch/resume.py) resubmits from the same rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.launch.cluster import JobState, job_states

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
ENDED = {"FAILED": "failed", "TIMEOUT": "timed out", "CANCELLED": "was cancelled", "OUT_OF_MEMORY": "ran out of memory"}


def find_launch(run: str) -> Path:
    """launch.json from a pipeline out_dir, a state dir, the file itself, or the pipeline recipe."""
    path = Path(run)
    candidates = [path / "pipeline" / "slurm" / "launch.json", path / "launch.json", path]
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from rlm_train.config import read_recipe

        out_dir = read_recipe(path).get("out_dir")
        if out_dir:
            candidates.insert(0, Path(out_dir) / "pipeline" / "slurm" / "launch.json")
    for candidate in candidates:
        if candidate.is_file() and candidate.name == "launch.json":
            return candidate
    raise UserError(f"{run}: no launch found (no pipeline/slurm/launch.json); pass the pipeline's out_dir "
                    "(or the --out of a stage launch)")


def attempts(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's submissions, oldest first: {job_id, tasks} (tasks: the array indices it reran,
    None for all); a launch.json written before `--resume` existed has its one job."""
    return stage.get("attempts") or [{"job_id": stage["job_id"], "tasks": None}]


def exit_codes(state: Path, stage: dict[str, Any]) -> dict[str, int]:
    """Exit records by task (`JOB` or `JOB_INDEX`), each task's from the newest submission that ran
    it: an index a resumed array job reruns no longer counts its old record."""
    name = stage["name"]
    owner: dict[str, str] = {}  # array index ("" for a plain job) -> the job that last ran it
    for attempt in attempts(stage):
        indices = attempt.get("tasks")
        if indices is None:
            owner = {"": attempt["job_id"]}
        for index in indices or []:
            owner[str(index)] = attempt["job_id"]
    codes = {}
    for path in (state / "exit").glob(f"{name}.*"):
        task = path.name[len(name) + 1:]
        job, _, index = task.partition("_")
        if owner.get(index, owner.get("")) != job:
            continue
        try:
            codes[task] = int(path.read_text().strip() or -1)
        except ValueError:
            codes[task] = -1
    return codes


def stage_state(stage: dict[str, Any], states: list[JobState], codes: dict[str, int]) -> tuple[str, str]:
    """(STATE, detail) of one stage from its newest job's Slurm states and its exit records."""
    expected = int(stage.get("shards") or 1)
    slurm = [s.state for s in states]
    failed = {task: code for task, code in codes.items() if code != 0}
    ended = sorted({s for s in slurm if s in FAILED})
    if any(s in ("RUNNING", "COMPLETING", "CONFIGURING") for s in slurm):
        done = sum(1 for c in codes.values() if c == 0)
        return "RUNNING", f"{done}/{expected} task(s) done" if expected > 1 else ""
    if failed:
        shown = ", ".join(f"{t} exit {c}" for t, c in sorted(failed.items()))
        if 143 in failed.values():
            shown += " (143: stopped by SIGTERM, the time limit's early signal or scancel)"
        # Slurm's word where it says more than "FAILED" (TIMEOUT, OUT_OF_MEMORY, CANCELLED, ...).
        return next((s for s in ended if s != "FAILED"), "FAILED"), shown
    if len(codes) >= expected:
        return "COMPLETED", f"{expected} task(s), exit 0" if expected > 1 else "exit 0"
    reasons = sorted({s.reason for s in states if s.reason})
    if any(s == "PENDING" for s in slurm):
        return "PENDING", ", ".join(reasons)
    if ended:
        return ended[0], ", ".join(reasons) or "ended without an exit record (killed before the script ran?)"
    if "COMPLETED" in slurm:
        return "COMPLETED", "(no exit record)"
    return "UNKNOWN", "Slurm no longer knows the job and it left no exit record"


def status_rows(record: dict[str, Any], state: Path) -> list[dict[str, Any]]:
    stages = record.get("stages", [])
    all_states = job_states([s["job_id"] for s in stages])
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for stage in stages:
        codes = exit_codes(state, stage)
        name, detail = stage_state(stage, all_states.get(stage["job_id"], []), codes)
        # The stage(s) whose failure stops this one: an `after` stage that failed, timed out or was
        # cancelled (Slurm's afterok never holds for it), or what stopped that one.
        dead = {a: by_name[a] for a in stage.get("after", []) if by_name.get(a, {}).get("state") in FAILED}
        roots = sorted({root for row in dead.values() for root in row["roots"]})
        never_runs = bool(roots) and name not in ("COMPLETED", "RUNNING")
        if never_runs:
            name = "CANCELLED" if name != "PENDING" else "PENDING"
            ended = ", ".join(f"{r} {ENDED.get(by_name[r]['state'], 'ended ' + by_name[r]['state'])}" for r in roots)
            detail = f"never runs: {ended}; fix it, then rlm-train launch --resume {record.get('out_dir')}"
        row = {**stage, "state": name, "detail": detail, "never_runs": never_runs, "roots": roots or [stage["name"]],
               "failed_tasks": [t for t, c in codes.items() if c != 0],
               "done_tasks": sorted(int(t.partition("_")[2] or 0) for t, c in codes.items() if c == 0),
               "queued_or_running": sorted(s.job_id for s in all_states.get(stage["job_id"], []) if s.state in ACTIVE)}
        rows.append(row)
        by_name[stage["name"]] = row
    return rows


def output_lines(stage: dict[str, Any]) -> list[str]:
    lines = []
    for key, path in (stage.get("outputs") or {}).items():
        there = "exists" if Path(str(path)).exists() else "not yet"
        lines.append(f"    {key}: {path} ({there})")
    run_dir = (stage.get("outputs") or {}).get("run_dir")
    if stage.get("run") == "generate" and run_dir and (Path(run_dir) / "manifest.json").is_file():
        from rlm_train.rollouts.shards import check_run

        try:
            lines.append(f"    records: {check_run([run_dir]).line()}")
        except UserError as exc:
            lines.append(f"    records: cannot check ({exc})")
    return lines


def log_files(stage: dict[str, Any]) -> list[str]:
    """The stage's log files (the sbatch --output pattern with its job id filled in)."""
    pattern = str(stage["log"]).replace("%A", stage["job_id"]).replace("%j", stage["job_id"]).replace("%a", "*")
    found = sorted(str(p) for p in Path(pattern).parent.glob(Path(pattern).name))
    return found or [pattern]


def error_lines(logs: list[str]) -> list[str]:
    """The last error line of each failed task's log (what the stage command printed)."""
    lines = []
    for log in logs:
        try:
            text = Path(log).read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [line.strip() for line in text if "error" in line.lower() or "Traceback" in line]
        if errors:
            lines.append(f"{Path(log).name}: {errors[-1][:300]}")
    return lines


def format_status(record: dict[str, Any], rows: list[dict[str, Any]], state: Path) -> str:
    resumed = f", resumed {', '.join(record['resumed'])}" if record.get("resumed") else ""
    lines = [f"pipeline {record.get('pipeline')} (recipe {record.get('recipe')}), submitted {record.get('submitted')}"
             f"{resumed}", f"state: {state}"]
    width = max(len(r["name"]) for r in rows) if rows else 5
    for row in rows:
        shards = f"[{row['shards']}]" if int(row.get("shards") or 1) > 1 else ""
        job = f"{row['job_id']}{shards}"
        lines.append(f"  {row['name']:<{width}}  job {job:<10} {row['state']:<10} {row['detail']}".rstrip())
        earlier = [a["job_id"] for a in attempts(row)[:-1]]
        if earlier:
            lines.append(f"    resubmitted by launch --resume; earlier job(s): {', '.join(earlier)}")
        logs = log_files(row)
        shown = logs[0] if len(logs) == 1 else row["log"].replace("%A", row["job_id"])
        lines.append(f"    log: {shown}" + ("" if len(logs) > 1 or Path(shown).exists() else " (not written)"))
        if row["state"] in FAILED:
            failed = [log for log in logs if any(f"-{task}." in Path(log).name for task in row["failed_tasks"])]
            lines += [f"    error: {line}" for line in error_lines(failed)]
        lines += output_lines(row)
    return "\n".join(lines)


def show_status(run: str, wait: bool = False, poll_s: float = 3.0) -> int:
    """Print the status; exit 1 when a stage failed or was cancelled, else 0."""
    path = find_launch(run)
    record = json.loads(path.read_text())
    state = path.parent
    rows = status_rows(record, state)
    doomed_since: float | None = None  # only jobs that can never run are left: Slurm cancels them soon
    while wait and any(r["state"] in ACTIVE for r in rows):
        if all(r["never_runs"] for r in rows if r["state"] in ACTIVE):
            doomed_since = doomed_since or time.monotonic()
            if time.monotonic() - doomed_since > 60:
                break
        time.sleep(poll_s)
        rows = status_rows(record, state)
    print(format_status(record, rows, state))
    return 1 if any(r["state"] in FAILED for r in rows) else 0
