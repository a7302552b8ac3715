"""The trajectory store: one directory per generation run.

    DIR/manifest.json             the run's identity (task file hash, policies, samples, RLM config)
    DIR/shard-<time>-<pid>.jsonl  one append-only shard per process run, one record per line
    DIR/summary.json              the last summary printed by `rlm-train generate`

Every record is appended with a single write, so a crash leaves at most a torn last
line in the shard being written; readers skip it. A process never appends to another
run's shard, so a torn line can only be the last line of a file. Resume = skip the
(task_id, sample) pairs already present in any shard.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, cast

from rlm_train.errors import UserError
from rlm_train.formats import SKIP, LineProblem, LineProblemKind, iter_jsonl, write_text_atomic
from rlm_train.records import TRAJECTORY_SCHEMA, TrajectoryRecord

MANIFEST_SCHEMA = "rlm-train/generate-run/v1"
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.jsonl"
# Manifest keys that define "the same run": a re-run must match all of them to resume.
IDENTITY_KEYS = ("tasks_sha256", "policy", "sub_policy", "samples", "rlm")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ReadStats:
    """What reading a store found besides good records (for reports)."""

    files: int = 0
    records: int = 0
    torn_lines: int = 0  # an unterminated or unparsable last line: a crash mid-write
    bad_lines: list[str] = field(default_factory=list)  # "file:line" of corrupt lines elsewhere
    duplicates: int = 0  # a (task_id, sample) seen again; the first record wins


def shard_files(directory: str | Path) -> list[Path]:
    """Shards in write order (their names start with the run's start time)."""
    return sorted(Path(directory).glob(SHARD_GLOB))


def _is_trajectory(record: dict[str, Any]) -> str | None:
    return None if record.get("schema") == TRAJECTORY_SCHEMA else f"not a trajectory (schema {record.get('schema')!r})"


def iter_shard(path: Path, stats: ReadStats) -> Iterator[TrajectoryRecord]:
    """Records of one shard. A bad line is reported on the console with its number and
    skipped, never fatal; a torn last line (a crash mid-write) is counted apart."""
    problems: list[LineProblem] = []
    for _, record in iter_jsonl(path, bad_lines=SKIP, check=_is_trajectory, problems=problems):
        yield cast(TrajectoryRecord, record)  # its schema was checked
    for problem in problems:
        if problem.kind == LineProblemKind.TORN:
            stats.torn_lines += 1
        else:
            stats.bad_lines.append(problem.where)


def read_records(source: str | Path, stats: ReadStats | None = None) -> list[TrajectoryRecord]:
    """Every trajectory in a store directory (or one JSONL file), one per (task_id, sample)."""
    stats = stats if stats is not None else ReadStats()
    source = Path(source)
    if source.is_dir():
        files = shard_files(source) or sorted(source.glob("*.jsonl"))
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"{source}: no such trajectory directory or file; pass the --out of `rlm-train generate`")
    out = list(_unique(files, stats))
    stats.records = len(out)
    return out


def iter_records(directory: str | Path) -> Iterator[TrajectoryRecord]:
    """The records of a run directory one at a time, one per (task_id, sample): what a
    resume skips and what the run's summary counts, without holding them all."""
    return _unique(shard_files(directory), ReadStats())


def _unique(files: list[Path], stats: ReadStats) -> Iterator[TrajectoryRecord]:
    seen: set[tuple[Any, Any]] = set()
    for path in files:
        stats.files += 1
        for record in iter_shard(path, stats):
            key = (record.get("task_id"), record.get("sample"))
            if record.get("task_id") is not None and key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            yield record


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not valid JSON; this is not a generate run directory (use another --out)") from None


def open_run(directory: str | Path, manifest: dict[str, Any]) -> bool:
    """Create the run directory, or check that an existing one holds this same run.

    Returns True when resuming. A directory holding a different run (or other files)
    is refused with a message naming the first field that differs.
    """
    directory = Path(directory)
    existing = read_manifest(directory)
    if existing is None:
        # Another shard may be writing the manifest right now (its temp file): not a leftover.
        leftovers = [p.name for p in directory.iterdir() if not p.name.startswith(f".{MANIFEST}.")] \
            if directory.is_dir() else []
        if leftovers:
            raise UserError(
                f"{directory}: not empty and has no {MANIFEST} (holds {', '.join(sorted(leftovers)[:3])}...); "
                "pass a new or empty --out directory"
            )
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return False
    for key in IDENTITY_KEYS:
        differs = _first_difference(key, existing.get(key), manifest.get(key))
        if differs is None:
            continue
        name, there, here = differs
        raise UserError(
            f"{directory} holds a different run: {name} is {_short(there)} there, {_short(here)} here; "
            "pass a new --out, or re-run the exact command that made it"
        )
    return True


def _first_difference(name: str, there: Any, here: Any) -> tuple[str, Any, Any] | None:
    """The first setting that differs, by dotted name (e.g. rlm.max_iterations), or None.
    A config key the old manifest lacks was added to the code after that run started: it
    could not have been set then, so it does not make the run a different one (a run
    resumes across an upgrade that adds a setting)."""
    if there == here:
        return None
    if isinstance(there, dict) and isinstance(here, dict):
        for sub in sorted(set(there) | set(here)):
            if sub not in there:
                continue
            found = _first_difference(f"{name}.{sub}", there.get(sub), here.get(sub))
            if found is not None:
                return found
        return None
    return name, there, here


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


class RunLock:
    """An exclusive lock on (run directory, shard slot): two writers of the same tasks would
    duplicate (task, sample) pairs. flock dies with the process, so a SIGKILL frees it."""

    def __init__(self, directory: str | Path, slot: str = "all"):
        self.path = Path(directory) / f".lock-{slot}"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for any new file
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(
                f"{self.path.parent}: another `rlm-train generate` (pid {holder}) is writing this run; "
                "wait for it or stop it first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def new_shard_path(directory: str | Path, slot: str = "all") -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return Path(directory) / f"shard-{stamp}-{slot}-{os.getpid()}.jsonl"
