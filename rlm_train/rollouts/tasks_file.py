"""Reading a task file for generation: every bad line is reported with its line number,
then skipped or fatal (--skip-bad-lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.formats import TASK_SCHEMA


def check_task(obj: Any, task_file: Path, seen: set[str]) -> str | None:
    """Why this task cannot be run, or None when it can."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if obj.get("schema") != TASK_SCHEMA:
        return f"schema is {obj.get('schema')!r}, expected {TASK_SCHEMA!r}"
    task_id = obj.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "field 'id' must be a non-empty string"
    if task_id in seen:
        return f"duplicate task id {task_id!r}"
    if not isinstance(obj.get("query"), str) or not obj["query"].strip():
        return f"task {task_id!r}: field 'query' must be a non-empty string"
    if "context" not in obj:
        rel = obj.get("context_path")
        if not isinstance(rel, str) or not rel:
            return f"task {task_id!r} has neither 'context' nor 'context_path'"
        if not (task_file.parent / rel).is_file():
            return f"task {task_id!r}: context_path {rel!r} not found next to the task file"
    if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
        return f"task {task_id!r}: field 'meta' must be an object"
    return None


def load_tasks(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(tasks, problems): the runnable tasks in file order and one 'file:line: why' per skipped line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: task file not found; pass an existing JSONL file to --tasks (see `rlm-train tasks`)")
    tasks: list[dict[str, Any]] = []
    problems: list[str] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                why = f"not valid JSON ({exc.msg})"
            else:
                why = check_task(obj, path, seen)
            if why is not None:
                problem = f"{path}:{lineno}: {why}"
                if not skip_bad_lines:
                    raise UserError(f"{problem}; fix the line, or pass --skip-bad-lines to skip bad lines")
                print(f"warning: skipping {problem}", file=sys.stderr)
                problems.append(problem)
                continue
            seen.add(obj["id"])
            tasks.append(obj)
    if not tasks:
        raise UserError(f"{path}: no runnable tasks" + (f" ({len(problems)} bad lines skipped)" if problems else ""))
    return tasks, problems
