"""The RL prompt set: built from trajectories (`prompt_rows`) and written by `rlm-train filter`, read
by `rlm-train grpo`.

On disk (`<out>/rl/`, a `datasets` save_to_disk DatasetDict with train and validation splits,
and the same rows in `<out>/rl-{train,validation}.jsonl`), one row per task:
`prompt` (the episode's first messages), `task_id`, `task_file` (the task record lives there),
and for reports `query`, `family`, `scorer`, `answer_json`, `pass_rate`, `episodes`.

`load_prompt_set` reads that, a task file (`rlm-train/task/v1` JSONL, e.g. from `rlm-train tasks`),
or rows that carry the task record itself under `task` (a JSON string or object; `context_path`
relative to the dataset, or absolute).

An RL prompt set shares no task with the SFT data it was made against (filter_report.json beside it
names those sets); `sft_overlap` tells GRPO when its prompts do share tasks with that data or with
the data its starting model was tuned on (sft_config.json beside the model or adapter).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.records import TaskRecord, TrajectoryRecord, check_task
from rlm_train.rlm import RLMConfig

# ---------------------------------------------------------------------------
# Builder and writer


def prompt_rows(records: list[TrajectoryRecord], tasks: dict[str, tuple[TaskRecord, str]],
                pass_rates: tuple[float, float], dropped: Counter[str],
                sft_tasks: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The rows of an RL prompt set from trajectories (`rlm-train filter`): one per task, with what the
    reward needs (the task reference: file + id; its answer and scorer) and the pass rate of the policy
    that generated the episodes. Tasks in `sft_tasks` (SFT trains on them) and tasks whose pass rate is
    outside `pass_rates` (low, high; with a window set, a task with no scored episode too) are left out,
    counted in `dropped` by reason."""
    low, high = pass_rates
    window = low > 0.0 or high < 1.0
    by_task: dict[str, list[TrajectoryRecord]] = defaultdict(list)
    for r in records:
        task_id = r.get("task_id")
        if task_id is not None:
            by_task[task_id].append(r)
    rows = []
    for task_id in sorted(by_task):
        group = by_task[task_id]
        if task_id in sft_tasks:
            dropped["used_by_sft"] += 1
            continue
        if task_id not in tasks:
            dropped["task_not_found"] += 1
            continue
        task, task_file = tasks[task_id]
        scores = [score for r in group if (score := r.get("score")) is not None]
        pass_rate = sum(scores) / len(scores) if scores else None
        if pass_rate is None and window:
            dropped["no_scored_episode"] += 1
            continue
        if pass_rate is not None and not (low <= pass_rate <= high):
            dropped["pass_rate_out_of_range"] += 1
            continue
        first = next((r for r in group if len(r.get("messages") or []) >= 2), None)
        if first is None:
            dropped["malformed"] += 1
            continue
        rows.append({
            "prompt": [{"role": m["role"], "content": m["content"]} for m in first["messages"][:2]],
            "query": task["query"],
            "task_id": task_id,
            "task_file": task_file,
            "family": task.get("family"),
            "scorer": task.get("scorer"),
            "answer_json": json.dumps(task.get("answer"), ensure_ascii=False),
            "pass_rate": pass_rate,
            "episodes": len(group),
        })
    return rows



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


# ---------------------------------------------------------------------------
# Disjoint from SFT


def sft_task_ids(datasets: list[str]) -> set[str]:
    """Every task id in SFT datasets (a save_to_disk directory, all its splits, or a JSONL file),
    from the `task_id` column `rlm-train filter` writes."""
    ids: set[str] = set()
    for name in datasets:
        path = Path(name).expanduser()
        if path.is_dir():
            from datasets import DatasetDict, load_from_disk

            try:
                loaded = load_from_disk(str(path))
            except Exception as exc:
                raise UserError(f"sft_data {path}: not a `datasets` save_to_disk directory "
                                f"({str(exc).splitlines()[0]})") from None
            for split in (loaded.values() if isinstance(loaded, DatasetDict) else [loaded]):
                if "task_id" not in split.column_names:
                    raise UserError(f"sft_data {path}: no task_id column; pass the sft/ that `rlm-train filter` wrote")
                ids.update(str(t) for t in split.unique("task_id") if t is not None)
        elif path.is_file():
            from rlm_train.formats import read_jsonl

            ids.update(str(row["task_id"]) for row in read_jsonl(path) if row.get("task_id") is not None)
        else:
            raise UserError(f"sft_data {path}: not found; pass the sft/ (or sft-*.jsonl) of `rlm-train filter`")
    return ids


def recorded_sft_data(prompts: str | os.PathLike) -> list[str]:
    """The SFT sets an RL prompt set was made disjoint from: filter_report.json beside `rl/` or
    `rl-*.jsonl` names them (none for a task file or an older filter's set)."""
    path = Path(prompts).expanduser()
    report = path.parent / "filter_report.json"
    if not report.is_file():
        return []
    try:
        return [str(p) for p in json.loads(report.read_text()).get("rl", {}).get("sft_data", [])]
    except (OSError, ValueError, AttributeError):
        return []


def tuned_on(*models: str | None) -> list[str]:
    """The dataset an SFT run trained a model on: sft_config.json in the output_dir holding the
    model, its adapter/ or merged/ (or a checkpoint)."""
    found = []
    for model in models:
        config = Path(model).expanduser().parent / "sft_config.json" if model else None
        if config is not None and config.is_file():
            try:
                dataset = json.loads(config.read_text()).get("dataset")
            except (OSError, ValueError):
                continue
            if dataset and dataset not in found:
                found.append(str(dataset))
    return found


def sft_overlap(prompt_set: PromptSet, model: str, adapter: str | None = None) -> list[str]:
    """Warnings, one line each, when GRPO's prompts share tasks with SFT data: the sets the RL set
    was made against and the one the starting model was tuned on. An SFT set that cannot be read
    any more is named, not fatal: the check only warns."""
    prompt_tasks = {row["task_id"] for row in prompt_set.rows}
    warnings = []
    for dataset in dict.fromkeys(recorded_sft_data(prompt_set.source) + tuned_on(model, adapter)):
        try:
            shared = prompt_tasks & sft_task_ids([dataset])
        except UserError as exc:
            warnings.append(f"cannot check the prompts against SFT data: {exc}")
            continue
        if shared:
            rows = sum(1 for row in prompt_set.rows if row["task_id"] in shared)
            warnings.append(
                f"{len(shared)} of {len(prompt_tasks)} prompt tasks ({rows} of {len(prompt_set.rows)} prompts) are SFT "
                f"tasks of {dataset}: GRPO on tasks the model was tuned to solve learns little; make the prompts with "
                f"`rlm-train filter rl_only=true sft_data=[{dataset}]` from RL-split trajectories")
    return warnings
