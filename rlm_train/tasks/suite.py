"""A task suite from one recipe: train and held-out splits (and an RL split for GRPO's
prompts, when the recipe asks for one) for several families and context lengths, written
as `train.jsonl`, `heldout.jsonl`, `rl.jsonl` and `manifest.json`.

The splits never share corpus items (each item belongs to one split by hash), keys
(needle keys, invented names, user ids are drawn per split) or seeds (every task seed
is derived from its split); `check_disjoint` verifies this on what was generated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from pydantic import Field, field_validator

from rlm_train.config import StrictModel, bounded
from rlm_train.errors import UserError
from rlm_train.formats import write_text_atomic
from rlm_train.tasks import corpora
from rlm_train.tasks.generate import (
    INLINE_MAX_TOKENS,
    MAX_TASKS,
    check_length,
    check_made_tokens,
    make_tasks,
    write_tasks,
)
from rlm_train.tasks.registry import family_names, get_family


class SplitCounts(StrictModel):
    train: int = bounded(0, ge=0, le=MAX_TASKS,
                         why="every task of a suite is built in memory before it is written; make several suites with different seeds")
    """Training tasks (SFT's) of this family per context length."""
    rl: int = bounded(0, ge=0, le=MAX_TASKS,
                      why="every task of a suite is built in memory before it is written; make several suites with different seeds")
    """GRPO's tasks of this family per context length (`rl.jsonl`): corpus items, keys and seeds
    of their own, so RL prompts never repeat what SFT trained on."""
    heldout: int = bounded(0, ge=0, le=MAX_TASKS,
                           why="every task of a suite is built in memory before it is written; make several suites with different seeds")
    """Held-out (evaluation) tasks of this family per context length."""


class TaskSuiteConfig(StrictModel):
    """`rlm-train tasks make --recipe FILE`: a whole suite with train and held-out splits."""

    out_dir: str = "data/tasks/suite"
    """Where train.jsonl, heldout.jsonl, rl.jsonl (when asked for), manifest.json (and big contexts) are written."""
    seed: int = 0
    """Suite seed; every task's own seed is derived from it, its family, split, length and index."""
    context_tokens: list[int] = Field(default_factory=lambda: [8000, 32000])
    """Context lengths (tokens) to generate every family at."""
    families: dict[str, SplitCounts] = Field(default_factory=dict)
    """family -> tasks per split per context length."""
    inline_max_tokens: int = Field(INLINE_MAX_TOKENS, ge=1)
    """Contexts of this many tokens or more are written to files beside the task file."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer directory to count tokens with; empty: 4 characters a token."""

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: dict[str, SplitCounts]) -> dict[str, SplitCounts]:
        for name in value:
            if name not in family_names():
                raise ValueError(f"unknown task family {name!r}; choose from {', '.join(family_names())}")
        return value


def suite_splits(config: TaskSuiteConfig) -> list[str]:
    """The splits a suite writes: train and heldout always, rl when a family asks for RL tasks."""
    return [split for split in corpora.SPLITS
            if split != "rl" or any(counts.rl for counts in config.families.values())]


def plan(config: TaskSuiteConfig) -> list[tuple[str, str, int, int]]:
    """(split, family, context_tokens, n) for every batch the suite makes, checked."""
    if not config.families:
        raise UserError("the suite recipe lists no families; add e.g. `families: {niah: {train: 10, heldout: 5}}`")
    if not config.context_tokens:
        raise UserError("the suite recipe lists no context_tokens; add e.g. `context_tokens: [8000, 32000]`")
    batches = []
    for split in suite_splits(config):
        for family, counts in config.families.items():
            n = getattr(counts, split)
            for tokens in config.context_tokens:
                check_length(family, tokens)
                if n:
                    batches.append((split, family, tokens, n))
    check_made_tokens(sum(tokens * n for *_, tokens, n in batches), "the suite's tasks x their context_tokens")
    return batches


def build_suite(config: TaskSuiteConfig, tokenizer: Any = None, progress=print) -> dict:
    """Generate, check and write the suite; return the manifest."""
    batches = plan(config)
    out = Path(config.out_dir)
    made: dict[str, list[dict]] = {split: [] for split in suite_splits(config)}
    for split, family, tokens, n in batches:
        progress(f"  {split:8s} {family:9s} {tokens:>9,} tokens x {n}")
        made[split].extend(make_tasks(family, n, tokens, config.seed, tokenizer=tokenizer, split=split))
    names = list(made)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            check_disjoint(made[a], made[b], (a, b))
    for split, tasks in made.items():
        write_tasks(out / f"{split}.jsonl", tasks, config.inline_max_tokens)
    manifest = {
        "schema": "rlm-train/task-suite/v1",
        "config": config.model_dump(),
        "corpora": [corpora.corpus_version(), corpora.stdlib_version()],
        "counts": {
            split: {
                family: sum(1 for t in tasks if t["family"] == family) for family in config.families
            }
            for split, tasks in made.items()
        },
        "files": {split: f"{split}.jsonl" for split in made},
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def split_keys(tasks: Iterable[dict]) -> dict[str, set]:
    """Everything that must not cross splits, read back from the tasks themselves: the
    seed and id of every task, and what each task's family names (`Family.split_keys`)."""
    keys: dict[str, set] = {"seed": set(), "id": set()}
    for task in tasks:
        for name, values in task_split_keys(task).items():
            keys.setdefault(name, set()).update(values)
    return keys


def task_split_keys(task: dict) -> dict[str, Iterable]:
    """One task's split keys: its id, its seed (when `meta` has one) and its family's keys
    (when the family is registered; a task file may hold tasks of a family made elsewhere)."""
    keys: dict[str, Iterable] = {"id": [task["id"]]}
    seed = (task.get("meta") or {}).get("seed")
    if seed is not None:
        keys["seed"] = [seed]
    if task.get("family") in family_names():
        keys.update(get_family(task["family"]).split_keys(task))
    return keys


def wording(task: dict) -> str:
    """A digest of what a model is shown: the query and the context (a string here)."""
    return hashlib.sha256(f"{task['query']}\0{task.get('context', '')}".encode()).hexdigest()


def shared_keys(train: Iterable[dict], heldout: Iterable[dict]) -> tuple[dict[str, int], int]:
    """What two task sets share: ({kind: how many values}, how many `heldout` tasks share any).

    The kinds are `split_keys`' (seed, id, each family's keys) plus `wording` (the same
    query over the same context). Only kinds with a shared value are listed: ({}, 0) means
    disjoint. Each task is read once and only its keys are kept, so both may be generators
    that load contexts one at a time; contexts must be strings (the families' keys read them)."""
    seen: dict[str, set] = {}
    for task in train:
        for name, values in task_split_keys(task).items():
            seen.setdefault(name, set()).update(values)
        seen.setdefault("wording", set()).add(wording(task))
    shared: dict[str, set] = {}
    tasks = 0
    for task in heldout:
        keys = {**task_split_keys(task), "wording": [wording(task)]}
        hit = False
        for name, values in keys.items():
            common = seen.get(name, set()).intersection(values)
            if common:
                shared.setdefault(name, set()).update(common)
                hit = True
        tasks += hit
    return {name: len(values) for name, values in shared.items()}, tasks


def check_disjoint(train: list[dict], heldout: list[dict], names: tuple[str, str] = ("train", "heldout")) -> None:
    a, b = split_keys(train), split_keys(heldout)
    for name in a:
        shared = a[name] & b.get(name, set())
        if shared:
            example = sorted(map(str, shared))[0]
            raise RuntimeError(f"{names[0]} and {names[1]} share {len(shared)} {name} value(s), e.g. {example!r}")
