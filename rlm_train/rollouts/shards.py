"""Sharded generation: which (task, sample) pairs each shard runs, and merging shard outputs.

    rlm-train generate --recipe R --shard 0/4     # one of 4 processes (a Slurm array task)

Assignment is a pure function of (task index, sample, number of tasks, samples, shards), so
every shard computes the same split from the same task file, and each pair belongs to exactly
one shard:

- at least as many tasks as shards: task i goes to shard i % n with all its samples, so a
  task's context is loaded once, on one node;
- fewer tasks than shards: pair j = i * samples + k goes to shard j % n, so no shard idles.

Shards may write into one shared run directory (the store's resume skips pairs any shard
recorded) or into directories of their own (no shared file system); `merge_runs` joins
directories of the same run into one, one record per (task, sample), and `check_run` says
which pairs are missing or duplicated against the task file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from rlm_train.errors import UserError
from rlm_train.formats import append_jsonl, write_text_atomic
from rlm_train.rollouts import store

T = TypeVar("T")

# Every (task, sample) pair of a run is enumerated before it starts: far above a real run
# (10,000 tasks sampled 1,000 times), it refuses a typo before the list fills memory.
MAX_PAIRS = 10_000_000


def shard_of(task_index: int, sample: int, num_tasks: int, samples: int, num_shards: int) -> int:
    """The shard (0..num_shards-1) that runs sample `sample` of task `task_index`."""
    if num_shards <= 1:
        return 0
    if num_tasks >= num_shards:
        return task_index % num_shards
    return (task_index * samples + sample) % num_shards


def shard_pairs(tasks: Sequence[T], samples: int, shard_index: int, num_shards: int) -> list[tuple[T, int]]:
    """This shard's (task, sample) pairs, a task's samples next to each other."""
    if not 0 <= shard_index < num_shards:
        raise UserError(f"shard {shard_index}/{num_shards}: the index must be in 0..{num_shards - 1}")
    n = len(tasks)
    if n * samples > MAX_PAIRS:
        raise UserError(f"{n:,} tasks x samples={samples:,} = {n * samples:,} (task, sample) pairs, above the bound of "
                        f"{MAX_PAIRS:,} a run (each is listed in memory before it starts); lower samples, or split "
                        "the task file into several runs")
    return [(task, k) for i, task in enumerate(tasks) for k in range(samples)
            if shard_of(i, k, n, samples, num_shards) == shard_index]


@dataclass
class RunCheck:
    """How complete a run is against its task file: expected pairs, records, what is off."""

    expected: int
    records: int
    missing: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0
    unexpected: list[tuple[str, int]] = field(default_factory=list)  # pairs the task file does not have

    @property
    def complete(self) -> bool:
        return not self.missing and not self.duplicates and not self.unexpected

    def line(self) -> str:
        text = f"{self.records} of {self.expected} (task, sample) pairs"
        if self.missing:
            text += f", {len(self.missing)} missing (e.g. {self.missing[0][0]}#{self.missing[0][1]})"
        if self.duplicates:
            text += f", {self.duplicates} duplicate records (the first of each is kept)"
        if self.unexpected:
            text += f", {len(self.unexpected)} not in the task file"
        return text


def expected_pairs(manifest: dict[str, Any], where: Path) -> set[tuple[str, int]]:
    """Every (task_id, sample) the run's task file and sample count call for."""
    from rlm_train.rollouts.tasks_file import load_tasks

    task_file = Path(manifest.get("tasks_file") or "")
    if not task_file.is_file():
        raise UserError(f"{where}: its task file {task_file} is not on this machine; copy it there to check the run")
    if store.file_sha256(task_file) != manifest.get("tasks_sha256"):
        raise UserError(f"{where}: the task file {task_file} changed since the run started; check against the original")
    tasks, _ = load_tasks(task_file, skip_bad_lines=True)
    return {(task["id"], k) for task in tasks for k in range(int(manifest.get("samples") or 1))}


def check_run(sources: Sequence[str | Path]) -> RunCheck:
    """Records across one or more directories of the same run, against its task file."""
    manifest = same_run(sources)
    stats = store.ReadStats()
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    for source in sources:
        for record in store.read_records(source, stats):
            key = (str(record.get("task_id")), int(record.get("sample") or 0))
            duplicates += key in seen
            seen.add(key)
    duplicates += stats.duplicates
    expected = expected_pairs(manifest, Path(sources[0]))
    return RunCheck(expected=len(expected), records=len(seen), missing=sorted(expected - seen),
                    duplicates=duplicates, unexpected=sorted(seen - expected))


def same_run(sources: Sequence[str | Path]) -> dict[str, Any]:
    """The manifest the directories share; a UserError naming the first that differs."""
    if not sources:
        raise UserError("no run directories given; pass the --out directories of the shards")
    first: dict[str, Any] | None = None
    for source in sources:
        manifest = store.read_manifest(source)
        if manifest is None:
            raise UserError(f"{source}: no {store.MANIFEST}; pass the --out directory of a `rlm-train generate` run")
        if first is None:
            first = manifest
            continue
        for key in store.IDENTITY_KEYS:
            if manifest.get(key) != first.get(key):
                raise UserError(f"{source}: a different run than {sources[0]} ({key} differs); "
                                "merge only the shards of one run")
    assert first is not None
    return first


def merge_runs(sources: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Join shard directories of one run into `out` (a new directory, or one holding this
    same run): one record per (task, sample), the first found kept. Returns counts."""
    out = Path(out)
    manifest = same_run(sources)
    resolved = {Path(s).resolve() for s in sources}
    if out.resolve() in resolved:
        raise UserError(f"--out {out}: is one of the sources; merge into a new directory")
    store.open_run(out, manifest)
    have = {(r.get("task_id"), r.get("sample")) for r in store.iter_records(out)}
    shard = store.new_shard_path(out, "merged")
    stats = store.ReadStats()
    added = 0
    with store.RunLock(out, "merge"):
        for source in sources:
            for record in store.read_records(source, stats):
                key = (record.get("task_id"), record.get("sample"))
                if key in have:
                    stats.duplicates += 1
                    continue
                have.add(key)
                append_jsonl(shard, record)
                added += 1
    result = {"out": str(out), "sources": [str(s) for s in sources], "added": added,
              "records": len(have), "duplicates_dropped": stats.duplicates, "torn_lines": stats.torn_lines}
    write_text_atomic(out / "merge.json", json.dumps(result, indent=2) + "\n")
    return result
