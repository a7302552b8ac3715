"""The RL prompt set: written by `rlm-train filter`, read by `rlm-train grpo`.

On disk (`<out>/rl/`, a `datasets` save_to_disk DatasetDict with train and validation splits,
and the same rows in `<out>/rl-{train,validation}.jsonl`), one row per task:
`prompt` (the episode's first messages), `task_id`, `task_file` (the task record lives there),
and for reports `query`, `family`, `scorer`, `answer_json`, `pass_rate`, `episodes`.

`load_prompt_set` reads that, a task file (`rlm-train/task/v1` JSONL, e.g. from `rlm-train tasks`),
or rows that carry the task record itself under `task` (a JSON string or object; `context_path`
relative to the dataset, or absolute).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.records import check_task
from rlm_train.rlm import RLMConfig

# ---------------------------------------------------------------------------
# Writer


def _rl_features():
    from datasets import Features, Value

    from rlm_train.rollouts.datasets import message_feature

    return Features({
        "prompt": message_feature(), "query": Value("string"), "task_id": Value("string"),
        "task_file": Value("string"), "family": Value("string"), "scorer": Value("string"),
        "answer_json": Value("string"), "pass_rate": Value("float64"), "episodes": Value("int64"),
    })


def write_rl_prompt_set(out: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    """`out/rl` (save_to_disk) and `out/rl-{split}.jsonl` from the rows of `filter.rl_prompts`."""
    from rlm_train.formats import write_jsonl_atomic
    from rlm_train.rollouts.datasets import write_datasets

    write_datasets(out / "rl", splits, _rl_features())
    for split in ("train", "validation"):
        write_jsonl_atomic(out / f"rl-{split}.jsonl", splits[split])


# ---------------------------------------------------------------------------
# Reader


@dataclass
class PromptSet:
    rows: list[dict[str, Any]]  # {"prompt": messages, "task_id": str}: what TRL iterates over
    tasks: dict[str, dict[str, Any]]  # task_id -> task record
    base_dirs: dict[str, Path]  # task_id -> directory its context_path is relative to
    source: str


def load_prompt_set(path: str | os.PathLike, rlm: RLMConfig) -> PromptSet:
    """Read a task file or an RL prompt set into rows for TRL plus the task records the rewards need."""
    path = Path(path).expanduser()
    if path.is_dir():
        rows, base = _read_dataset_dir(path), path
    elif path.is_file():
        from rlm_train.formats import read_jsonl

        rows, base = read_jsonl(path), path.parent
    else:
        raise UserError(f"prompts {path} not found: pass a task JSONL (rlm-train tasks) or the RL prompt set "
                        "from `rlm-train filter` (a directory or .jsonl)")
    if not rows:
        raise UserError(f"{path}: no prompts in it")
    tasks: dict[str, dict[str, Any]] = {}
    base_dirs: dict[str, Path] = {}
    out: list[dict[str, Any]] = []
    task_files: dict[Path, dict[str, dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        row_base = base
        if "task_file" in row and "task" not in row:
            # `rlm-train filter` rows reference their task by file and id.
            row, row_base = _resolve_task_reference(row, base, task_files, f"{path} row {i}")
        task = _task_of_row(row, f"{path} row {i}")
        task_id = task["id"]
        if task_id in tasks and tasks[task_id] != task:
            raise UserError(f"{path} row {i}: task id {task_id!r} appears twice with different content; ids must be unique")
        tasks[task_id] = task
        base_dirs[task_id] = row_base
        prompt = row.get("prompt") if "task" in row else None
        if prompt is None:
            prompt = initial_messages(task, load_context(task, base), rlm)
        out.append({"prompt": prompt, "task_id": task_id})
    return PromptSet(rows=out, tasks=tasks, base_dirs=base_dirs, source=str(path))


def _resolve_task_reference(row, base: Path, cache: dict, where: str) -> tuple[dict[str, Any], Path]:
    """An RL prompt row {task_file, task_id, prompt, ...} -> the row with its task record, and
    the directory the task's context_path is relative to."""
    from rlm_train.formats import iter_jsonl

    task_file = Path(row["task_file"])
    if not task_file.is_absolute() and not task_file.is_file():
        task_file = base / task_file
    if not task_file.is_file():
        raise UserError(f"{where}: task_file {row['task_file']!r} not found; re-run `rlm-train filter --tasks FILE`")
    if task_file not in cache:
        tasks = iter_jsonl(task_file, check=lambda obj: check_task(obj, task_file), fix="fix the task file")
        cache[task_file] = {t["id"]: t for _, t in tasks}
    task = cache[task_file].get(row.get("task_id"))
    if task is None:
        raise UserError(f"{where}: task {row.get('task_id')!r} is not in {task_file}")
    return {**row, "task": task}, task_file.parent


def _read_dataset_dir(path: Path) -> list[dict[str, Any]]:
    from rlm_train.rollouts.datasets import load_train_split

    return [dict(r) for r in load_train_split(path)]


def _task_of_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A row is a task record itself, or an RL prompt row carrying one under `task`."""
    task = row.get("task", row)
    if isinstance(task, str):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: column 'task' is not valid JSON ({exc.msg})") from None
    why = check_task(task)
    if why is not None:
        raise UserError(f"{where}: not a task record or an RL prompt row with a 'task' column ({why}); "
                        "make the prompt set with `rlm-train tasks` or `rlm-train filter`")
    if "answer" not in task:
        raise UserError(f"{where}: task {task['id']!r} has no 'answer', so no reward can be computed")
    if "task_id" in row and row["task_id"] != task["id"]:
        raise UserError(f"{where}: task_id {row['task_id']!r} does not match its task's id {task['id']!r}")
    return task


def load_context(task: dict[str, Any], base_dir: Path) -> Any:
    from rlm_train.formats import load_task_context

    # load_task_context resolves context_path beside a task *file*; any name in base_dir will do.
    return load_task_context(task, Path(base_dir) / "_")


def initial_messages(task: dict[str, Any], context: Any, rlm: RLMConfig) -> list[dict[str, str]]:
    """The first two messages the RLM loop will send (for TRL's prompt column and logs)."""
    from rlm_train.rlm import prompts

    return [
        {"role": "system", "content": prompts.system_prompt(rlm.prompt_style, context, rlm.sub_model_chars)},
        {"role": "user", "content": prompts.first_user_prompt(task["query"], context)},
    ]
