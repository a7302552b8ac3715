"""`rlm-train launch --resume RUN`: submit a launched pipeline again from the stages that did not complete.

What each stage came to is what `--status` says (launch.json, the exit records, Slurm's states).
Stages that completed are not rerun. Every other one (failed, timed out, cancelled, or never run
because a stage before it died) is submitted again with its script as rendered at launch, with
`--dependency=afterok` on the resubmitted stages it comes after; a sharded generation stage
reruns only the array tasks that did not exit 0 (`sbatch --array=1,3`). The commands resume by
themselves: generation skips the (task, sample) pairs it recorded, SFT and GRPO continue from
the newest checkpoint in their output_dir (`resume: auto`). launch.json keeps every job id a
stage had (`attempts`), so `--status` reads each task's newest exit record.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.launch.status import ACTIVE, attempts, find_launch, status_rows


@dataclass
class Resubmission:
    """One stage `--resume` submits again."""

    name: str
    script: str  # the rendered script launch wrote
    after: list[str]  # the resubmitted stages it waits for (completed ones need no waiting)
    tasks: list[int] | None  # array indices to rerun; None: the whole job
    array: str | None  # sbatch --array for those indices (with the script's %max_parallel)
    was: str  # what the last job came to, for the printout


def _max_parallel(script: str) -> str:
    """The `%K` of the script's `#SBATCH --array=0-N%K`, or ''."""
    try:
        match = re.search(r"^#SBATCH --array=\S*?(%\d+)\s*$", Path(script).read_text(), re.M)
    except OSError:
        return ""
    return match.group(1) if match else ""


def plan_resume(rows: list[dict[str, Any]], where: str) -> list[Resubmission]:
    """The stages to submit again, in launch order, from `--status` rows; a UserError when there is
    nothing to resume (every stage completed) or not yet (a stage is still queued or running)."""
    # A pending job whose dependency died never runs (Slurm cancels it): it is resubmitted too. A
    # stage with a failed array task and others still queued or running is busy.
    busy = [r for r in rows if (r["state"] in ACTIVE or r["queued_or_running"]) and not r["never_runs"]]
    if busy:
        shown = ", ".join(f"{r['name']} (job {r['job_id']}, {r['state']}"
                          + (f"; {', '.join(r['queued_or_running'])} not ended" if r["state"] not in ACTIVE else "") + ")"
                          for r in busy)
        raise UserError(f"{where}: nothing to resume yet: {shown} still queued or running; wait for it "
                        "(rlm-train launch --status RUN --wait) or scancel it, then resume")
    rerun = [r for r in rows if r["state"] != "COMPLETED"]
    if not rerun:
        raise UserError(f"{where}: nothing to resume: all {len(rows)} stage(s) completed")
    names = {r["name"] for r in rerun}
    plan = []
    for row in rerun:
        tasks: list[int] | None = None
        array = None
        shards = int(row.get("shards") or 1)
        if shards > 1:
            tasks = [i for i in range(shards) if i not in row["done_tasks"]] or None
            if tasks is not None:
                array = ",".join(map(str, tasks)) + _max_parallel(row["script"])
        was = f"job {row['job_id']}: {row['state']}" + (f", {row['detail']}" if row["detail"] else "")
        plan.append(Resubmission(row["name"], row["script"], [a for a in row.get("after", []) if a in names],
                                 tasks, array, was))
    return plan


def resume(run: str, dry_run: bool = False) -> int:
    """Submit the unfinished stages of RUN again; print what was submitted."""
    from rlm_train.formats import write_text_atomic
    from rlm_train.launch import cluster

    path = find_launch(run)
    record = json.loads(path.read_text())
    cluster.slurm_command(["sinfo", "-h", "-o", "%P"])  # no Slurm or no controller: one line, before any state is read
    rows = status_rows(record, path.parent)
    plan = plan_resume(rows, str(path))
    for item in plan:
        if not Path(item.script).is_file():
            raise UserError(f"{path}: stage {item.name}'s script {item.script} is gone; launch the pipeline again")
    completed = [r["name"] for r in rows if r["state"] == "COMPLETED"]
    if dry_run:
        for item in plan:
            print(f"{item.name}: would resubmit {item.script}{_describe(item, {})}  ({item.was})")
        print(f"dry run: nothing submitted; completed, not rerun: {', '.join(completed) or 'none'}", file=sys.stderr)
        return 0
    cluster.cancel([r["job_id"] for r in rows if r["state"] in ACTIVE])  # the never-runs left pending
    ids: dict[str, str] = {}
    try:
        for item in plan:
            extra = [f"--array={item.array}"] if item.array else []
            ids[item.name] = cluster.submit(item.script, [ids[name] for name in item.after], extra)
    except UserError as exc:
        cluster.cancel(list(ids.values()))
        raise UserError(f"{exc}; cancelled the jobs resubmitted so far ({', '.join(ids.values()) or 'none'}); "
                        f"{path} is unchanged") from None
    by_name = {item.name: item for item in plan}
    for stage in record["stages"]:
        if stage["name"] in ids:
            stage["attempts"] = [*attempts(stage), {"job_id": ids[stage["name"]], "tasks": by_name[stage["name"]].tasks}]
            stage["job_id"] = ids[stage["name"]]
    record.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    for item in plan:
        print(f"{item.name}: job {ids[item.name]}{_describe(item, ids)}  (was {item.was})")
    print(f"resubmitted {len(plan)} stage(s); completed, not rerun: {', '.join(completed) or 'none'}; "
          f"follow them with: rlm-train launch --status {record.get('out_dir')}")
    return 0


def _describe(item: Resubmission, ids: dict[str, str]) -> str:
    tasks = f" [tasks {','.join(map(str, item.tasks))}]" if item.tasks is not None else ""
    after = f" after {', '.join(f'{n} ({ids[n]})' if n in ids else n for n in item.after)}" if item.after else ""
    return tasks + after
