"""make_tasks: deterministic task generation from (family, n, context_tokens, seed, split),
and writing task files (big contexts beside the file, referenced by `context_path`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.formats import dumps_line, write_text_atomic
from rlm_train.records import TASK_SCHEMA
from rlm_train.tasks import corpora
from rlm_train.tasks.common import CHARS_PER_TOKEN, derive_seed, token_counter
from rlm_train.tasks.registry import get_family

MAX_TOKENS = 16_000_000
INLINE_MAX_TOKENS = 256_000  # contexts at least this big go to their own file
# Every task of a file (or a suite) is built in memory before it is written, ~4 bytes a context
# token: these bounds refuse a typo at once; real training and eval sets are far smaller.
MAX_TASKS = 100_000
MAX_MADE_TOKENS = 1_000_000_000


def check_count(n: int, context_tokens: int) -> None:
    """`n` tasks of `context_tokens` each: a positive count that fits in memory while it is made."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"n must be a positive integer, got {n!r}")
    if n > MAX_TASKS:
        raise UserError(f"n={n:,} is above the bound of {MAX_TASKS:,} tasks a file (every task is built in memory "
                        "before the file is written); make several files with different seeds")
    check_made_tokens(n * context_tokens, f"n={n:,} x context_tokens={context_tokens:,}")


def check_made_tokens(total: int, what: str) -> None:
    if total > MAX_MADE_TOKENS:
        raise UserError(f"{what} = {total:,} context tokens, above the bound of {MAX_MADE_TOKENS:,} made at once "
                        "(all held in memory, ~4 bytes a token, until written); lower the count or the length, "
                        "or make several files with different seeds")


def check_length(family: str, context_tokens: int) -> None:
    unit = get_family(family)
    if not isinstance(context_tokens, int) or isinstance(context_tokens, bool):
        raise UserError(f"context_tokens must be an integer, got {context_tokens!r}")
    if context_tokens < unit.min_tokens:
        raise UserError(
            f"context_tokens={context_tokens} is smaller than one {family} task can be "
            f"(at least {unit.min_tokens} tokens: one record set, needle or document group); raise it"
        )
    if context_tokens > MAX_TOKENS:
        raise UserError(f"context_tokens={context_tokens} is above the supported {MAX_TOKENS:,}; lower it")


def task_id(family: str, split: str, context_tokens: int, seed: int, index: int) -> str:
    size = f"{context_tokens // 1000}k" if context_tokens % 1000 == 0 else str(context_tokens)
    return f"{family}-{split}-{size}-s{seed}-{index:05d}"


def task_seed(family: str, split: str, context_tokens: int, seed: int, index: int) -> int:
    return derive_seed("rlm-train-task", family, split, context_tokens, seed, index)


def make_task(family: str, context_tokens: int, seed: int, index: int, split: str = "train", tokenizer: Any = None) -> dict:
    unit = get_family(family)
    check_length(family, context_tokens)
    corpora.check_split(split)
    count, method = token_counter(tokenizer)
    per_task_seed = task_seed(family, split, context_tokens, seed, index)
    target_chars = context_tokens * CHARS_PER_TOKEN
    body = unit.generate(random.Random(per_task_seed), target_chars, split)
    tokens = count(body["context"])
    if tokenizer is not None and abs(tokens - context_tokens) > 0.03 * context_tokens and tokens > 0:
        # One rescale with the measured characters-per-token, same seed: deterministic.
        target_chars = int(target_chars * context_tokens / tokens)
        body = unit.generate(random.Random(per_task_seed), target_chars, split)
        tokens = count(body["context"])
    meta = {
        "context_tokens": tokens,
        "requested_tokens": context_tokens,
        "token_count": method,
        "context_chars": len(body["context"]),
        "seed": per_task_seed,
        "suite_seed": seed,
        "index": index,
        "split": split,
        "corpus": unit.corpus_version(),
        **body["meta"],
    }
    return {
        "schema": TASK_SCHEMA,
        "id": task_id(family, split, context_tokens, seed, index),
        "family": family,
        "query": body["query"],
        "context": body["context"],
        "answer": body["answer"],
        "scorer": unit.scorer,
        "meta": meta,
    }


def make_tasks(
    family: str, n: int, context_tokens: int, seed: int = 0, tokenizer: Any = None, split: str = "train"
) -> list[dict]:
    """`n` tasks of `family` at about `context_tokens` tokens each, from `split`'s corpus
    items and keys (default `train`; GRPO's tasks come from `split="rl"`, held-out tasks
    from `split="heldout"`).

    The same arguments always give the same tasks. `tokenizer` (an object with
    `.encode`, or a callable) makes `meta.context_tokens` a real count; without it the
    count is the stated estimate of 4 characters a token."""
    get_family(family)
    check_length(family, context_tokens)
    corpora.check_split(split)
    check_count(n, context_tokens)
    return [make_task(family, context_tokens, seed, i, split, tokenizer) for i in range(n)]


def write_tasks(path: str | Path, tasks: list[dict], inline_max_tokens: int = INLINE_MAX_TOKENS) -> Path:
    """Write tasks as JSONL. Contexts of `inline_max_tokens` or more go to
    `<stem>.contexts/<id>.txt` beside the file and the task records `context_path`."""
    path = Path(path)
    lines = []
    for task in tasks:
        record = dict(task)
        if "context" in record and record["meta"].get("context_tokens", 0) >= inline_max_tokens:
            rel = Path(f"{path.stem}.contexts") / f"{task['id']}.txt"
            write_text_atomic(path.parent / rel, record.pop("context"))
            # Keep key order stable: context_path where context was.
            record = {k: record[k] for k in ("schema", "id", "family", "query")} | {
                "context_path": rel.as_posix()
            } | {k: v for k, v in record.items() if k not in ("schema", "id", "family", "query")}
        lines.append(dumps_line(record))
    write_text_atomic(path, "".join(lines))
    return path
