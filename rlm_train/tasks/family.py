"""`Family`: one task family as one unit, everything the suite needs to know about it.

A family module builds its `Family` at its end and `rlm_train.tasks.registry` lists it;
generation, scoring, length checks and the split-leak check all go through that one
object, never through the family's name. A family added from outside the package
(a plugin, a test) passes its own `Family` to `registry.register_family`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rlm_train.tasks import corpora

Generator = Callable[[random.Random, int, str], dict]
"""(rng, target_chars, split) -> {"query", "context", "answer", "meta"}: deterministic in rng."""
Scorer = Callable[[dict, Any], float]
"""(task, answer) -> score in [0, 1]; the task's own answer scores 1.0."""
SplitKeys = Callable[[dict], dict[str, Iterable]]
"""task -> {kind: values} that must never appear in both the train and held-out split."""

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


def no_split_keys(task: dict) -> dict[str, Iterable]:
    """For families whose items carry no keys beyond the task seed and id."""
    return {}


@dataclass(frozen=True)
class Family:
    name: str
    """Written to every task's `family` field and id (`<name>-<split>-<size>-s<seed>-<index>`)."""
    generate: Generator
    """Builds one task body from a seeded rng, a target length in characters and a split."""
    scorer: str
    """The scorer's name, written to every task's `scorer` field; task files are scored by it."""
    score: Scorer
    """The scorer itself, found by `scorer` when a task file is scored."""
    min_tokens: int
    """The smallest context one task can have (one record set, needle or document group)."""
    corpus_version: Callable[[], str] = corpora.corpus_version
    """What the contexts are drawn from, recorded in each task's `meta.corpus`."""
    split_keys: SplitKeys = no_split_keys
    """What must not cross splits, read back from a task (see `suite.check_disjoint`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"family name {self.name!r}: use lower-case letters, digits and '_' (it goes into task ids)")
        if not isinstance(self.scorer, str) or not self.scorer:
            raise ValueError(f"family {self.name!r}: scorer must be a non-empty name, got {self.scorer!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 1:
            raise ValueError(f"family {self.name!r}: min_tokens must be a positive integer, got {self.min_tokens!r}")
        for field in ("generate", "score", "corpus_version", "split_keys"):
            if not callable(getattr(self, field)):
                raise ValueError(f"family {self.name!r}: {field} must be callable")
