"""On-disk formats shared by every stage (JSON Lines, one object a line, each with `schema`).

Kept at the bottom of the import graph: no heavy imports, no dependency on other stages.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlm_train.errors import UserError

TASK_SCHEMA = "rlm-train/task/v1"
TRAJECTORY_SCHEMA = "rlm-train/trajectory/v1"

# Episode outcomes written to trajectory["outcome"].
OUTCOME_FINAL = "final"  # the model answered with FINAL / FINAL_VAR
OUTCOME_MAX_ITERATIONS = "max_iterations"  # answered only on the forced last turn, or not at all
OUTCOME_BUDGET = "budget_exhausted"  # a call-tree budget (sub-calls, tokens, wall, ...) ran out
OUTCOME_ERROR = "error"  # the episode could not go on (server unreachable, ...)

# trajectory["error_kind"] when outcome is error: who failed.
ERROR_MODEL = "model"  # a root model call failed after the client's retries
ERROR_SANDBOX = "sandbox"  # the REPL sandbox could not start or keep a worker
ERROR_INTERNAL = "internal"  # anything else (a bug)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line; a bad line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or delete the line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


def dumps_line(obj: dict[str, Any]) -> str:
    """One JSON line (no embedded newlines), UTF-8 kept readable."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_jsonl_atomic(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write a whole JSONL file so that readers see the old file or the new one, never half."""
    write_text_atomic(path, "".join(dumps_line(r) for r in records))


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record with a single write() so a crash leaves no torn line.

    O_APPEND makes each write land at the end atomically with respect to other
    appenders; readers should still skip a final line without a newline.
    """
    data = dumps_line(record).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def load_task_context(task: dict[str, Any], task_file: str | Path) -> Any:
    """A task's context: inline `context`, or `context_path` relative to the task file."""
    if "context" in task:
        return task["context"]
    rel = task.get("context_path")
    if not rel:
        raise UserError(f"{task_file}: task {task.get('id')!r} has neither 'context' nor 'context_path'")
    path = Path(task_file).parent / rel
    if not path.is_file():
        raise UserError(f"{task_file}: task {task.get('id')!r}: context_path {rel!r} not found at {path}")
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return path.read_text(encoding="utf-8")


def read_context_file(path: str | Path) -> Any:
    """A context from disk: `.json` is parsed (str, list or dict); anything else is UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: context file not found; pass an existing file to --context-file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8) or pass a .json file"
        ) from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); fix it or rename to .txt") from None
    return text
