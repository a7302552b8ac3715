"""Reading a task file for generation: every bad line is reported with its line number,
then skipped or fatal (--skip-bad-lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from rlm_train.errors import UserError
from rlm_train.formats import FAIL, SKIP, LineProblem, iter_jsonl
from rlm_train.records import TaskRecord, check_task


def load_tasks(path: str | Path, skip_bad_lines: bool = False, warn: bool = True) -> tuple[list[TaskRecord], list[str]]:
    """(tasks, problems): the runnable tasks in file order and one 'file:line: why' per skipped line
    (each also warned on stderr unless `warn` is False: a later stage re-reading the file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a task JSONL file to --tasks (e.g. {path / 'train.jsonl'})")
    if not path.is_file():
        raise UserError(f"{path}: task file not found; pass an existing JSONL file to --tasks (see `rlm-train tasks`)")
    seen: set[str] = set()
    problems: list[LineProblem] = []

    def check(obj: dict[str, Any]) -> str | None:
        why = check_task(obj, path, seen)
        if why is None:
            seen.add(obj["id"])
        return why

    tasks = [cast(TaskRecord, task) for _, task in iter_jsonl(path, bad_lines=SKIP if skip_bad_lines else FAIL, check=check,
                                            problems=problems, warn=warn,
                                            fix="fix the line, or pass --skip-bad-lines to skip bad lines")]
    if not tasks:
        raise UserError(f"{path}: no runnable tasks" + (f" ({len(problems)} bad lines skipped)" if problems else ""))
    return tasks, [str(problem) for problem in problems]
