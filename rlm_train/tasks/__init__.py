"""Task families, offline corpora and scorers.

    from rlm_train.tasks import make_tasks, score
    tasks = make_tasks("oolong", n=10, context_tokens=32_000, seed=0)
    score(tasks[0], tasks[0]["answer"])  # 1.0

Families: niah, oolong, pairs, multihop, codeqa (see each module's docstring). Each is
one `Family` (generator, scorer, minimum size) in `rlm_train.tasks.registry`, where a new
family is registered too.

This package is the bottom layer for tasks: it imports nothing from `rlm_train.models`
or `rlm_train.policies` (the scripted teacher, oracle and baselines live there, above it).
"""

from __future__ import annotations

from typing import Any


def make_tasks(family: str, n: int, context_tokens: int, seed: int = 0, tokenizer: Any = None, split: str = "train") -> list[dict]:
    """Deterministic tasks; see rlm_train.tasks.generate.make_tasks."""
    from rlm_train.tasks.generate import make_tasks as _make

    return _make(family, n, context_tokens, seed, tokenizer=tokenizer, split=split)


def score(task: dict, answer: Any) -> float:
    """Score a model's answer to a task in [0, 1]; the task's own answer scores 1.0."""
    from rlm_train.tasks.registry import score as _score

    return _score(task, answer)


FAMILIES = ("niah", "oolong", "pairs", "multihop", "codeqa")  # the built-ins (registry.BUILTIN), by name

__all__ = ["FAMILIES", "make_tasks", "score"]
