"""Scoring a predictions file against a task file: every task scored, nothing dropped."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.formats import iter_jsonl
from rlm_train.tasks.registry import score


def load_predictions(path: str | Path) -> dict[str, object]:
    """id -> answer; a line without an id or answer, or a repeated id, is a UserError."""
    out: dict[str, object] = {}
    for lineno, row in iter_jsonl(path):
        if "id" not in row or "answer" not in row:
            raise UserError(f'{path}:{lineno}: a prediction needs "id" and "answer" fields, got {sorted(row)}')
        key = str(row["id"])
        if key in out:
            raise UserError(f"{path}:{lineno}: prediction id {key!r} appears twice; keep one answer per task")
        out[key] = row["answer"]
    return out


def score_files(tasks_path: str | Path, predictions_path: str | Path) -> tuple[list[dict], dict]:
    """(per-task rows, summary). Missing or extra prediction ids are errors, never skips."""
    tasks = [task for _, task in iter_jsonl(tasks_path)]
    if not tasks:
        raise UserError(f"{tasks_path}: no tasks to score")
    predictions = load_predictions(predictions_path)
    ids = [str(t.get("id")) for t in tasks]
    if len(set(ids)) != len(ids):
        raise UserError(f"{tasks_path}: task ids are not unique; regenerate the task file")
    missing = [i for i in ids if i not in predictions]
    extra = sorted(set(predictions) - set(ids))
    if missing:
        raise UserError(
            f"{predictions_path}: no prediction for {len(missing)} of {len(ids)} tasks "
            f"(first: {missing[0]!r}); add an answer (an empty string scores 0) for every task id"
        )
    if extra:
        raise UserError(
            f"{predictions_path}: {len(extra)} prediction id(s) not in {tasks_path} (first: {extra[0]!r}); "
            "score against the task file they were made for"
        )
    rows: list[dict[str, Any]] = []
    by_family: dict[str, list[float]] = defaultdict(list)
    for task, key in zip(tasks, ids):
        value = score(task, predictions[key])
        rows.append({"id": key, "family": task.get("family"), "score": value})
        by_family[str(task.get("family"))].append(value)
    summary = {
        "n": len(rows),
        "mean": sum(r["score"] for r in rows) / len(rows),
        "families": {f: (len(v), sum(v) / len(v)) for f, v in by_family.items()},
    }
    return rows, summary
