"""What `rlm-train view` reads: trajectory files, generate run directories, and eval
directories that hold one run directory per method.

    FILE.jsonl             one source (the method is the file's stem)
    RUN_DIR/               a generate store (shard-*.jsonl, or *.jsonl): one source
    EVAL_DIR/              no shards of its own: every run directory below it (up to
                           three levels, hidden ones skipped) is a source, named by its
                           path under EVAL_DIR less the folders all of them share: that
                           name is the method (`rlm-train eval`'s OUT/runs/METHOD/ is METHOD)
    EVAL_DIR/report.json   the same as EVAL_DIR (its report is shown raw in the page)

Bad lines never stop the viewer: each is skipped and kept as `file:line: why` for the
page to list. Records are kept one per (task_id, sample) per source, the first wins, as
`rollouts.store.read_records` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.formats import SKIP, LineProblem, iter_jsonl
from rlm_train.records import TRAJECTORY_SCHEMA, TrajectoryRecord
from rlm_train.rollouts.store import MANIFEST, SHARD_GLOB, read_manifest, shard_files

REPORT = "report.json"
MAX_DEPTH = 3  # how deep an eval directory's run directories may sit
REPORT_MAX_CHARS = 200_000


@dataclass
class Source:
    """One method's episodes."""

    method: str
    path: str
    files: list[str] = field(default_factory=list)
    records: list[TrajectoryRecord] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    duplicates: int = 0


@dataclass
class Loaded:
    sources: list[Source]
    problems: list[str]  # `file:line: why` of every skipped line
    report: str | None = None  # an eval directory's report.json, as text
    root: str = ""

    @property
    def episodes(self) -> int:
        return sum(len(s.records) for s in self.sources)


def check_trajectory(record: dict[str, Any]) -> str | None:
    """Why this JSON object is not a trajectory the viewer can show, or None."""
    if record.get("schema") != TRAJECTORY_SCHEMA:
        return f"not a trajectory (schema {record.get('schema')!r})"
    if not isinstance(record.get("turns"), list) or not all(isinstance(t, dict) for t in record["turns"]):
        return "field 'turns' must be a list of objects"
    return None


def _is_run_dir(path: Path) -> bool:
    return any(path.glob(SHARD_GLOB)) or (path / MANIFEST).is_file()


def _run_dirs(root: Path) -> list[Path]:
    """Run directories under `root` (not `root` itself), in name order."""
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if depth and _is_run_dir(here):
            found.append(here)
            dirnames[:] = []  # a run directory's own subdirectories are its business
        elif depth >= MAX_DEPTH:
            dirnames[:] = []
    return found


def _read_files(source: Source, files: list[Path], problems: list[str]) -> None:
    seen: set[tuple[Any, Any]] = set()
    for path in files:
        source.files.append(str(path))
        bad: list[LineProblem] = []
        for _, record in iter_jsonl(path, bad_lines=SKIP, check=check_trajectory, problems=bad):
            key = (record.get("task_id"), record.get("sample"))
            if record.get("task_id") is not None and key in seen:
                source.duplicates += 1
                continue
            seen.add(key)
            source.records.append(record)  # type: ignore[arg-type]  # its schema was checked
        problems.extend(str(problem) for problem in bad)


def _manifest(directory: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        return read_manifest(directory)
    except UserError as exc:
        problems.append(str(exc))
        return None


def load(paths: list[str | os.PathLike[str]]) -> Loaded:
    """Every trajectory under `paths` (see the module docstring), grouped by method.

    Raises a one-line UserError for a path that does not exist and when nothing under
    the paths is a trajectory."""
    sources: list[Source] = []
    problems: list[str] = []
    report: str | None = None
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"{raw}: no such file or directory; pass a trajectory JSONL file, "
                            "a generate run directory or an eval directory")
        if path.is_file() and path.name == REPORT:
            path = path.parent
        if path.is_file():
            src = Source(method=path.stem, path=str(path))
            _read_files(src, [path], problems)
            sources.append(src)
            continue
        if not path.is_dir():
            raise UserError(f"{raw}: not a file or a directory; pass a trajectory JSONL file or a run directory")
        if (path / REPORT).is_file():
            text = (path / REPORT).read_text(encoding="utf-8", errors="replace")
            report = text if len(text) <= REPORT_MAX_CHARS else text[:REPORT_MAX_CHARS] + "\n... (clipped)"
        shards = shard_files(path)
        nested = [] if shards else _run_dirs(path)
        if shards or not nested:
            files = shards or sorted(path.glob("*.jsonl"))
            src = Source(method=path.resolve().name, path=str(path), manifest=_manifest(path, problems))
            _read_files(src, files, problems)
            sources.append(src)
            continue
        for run_dir, method in zip(nested, _method_names(path, nested)):
            src = Source(method=method, path=str(run_dir), manifest=_manifest(run_dir, problems))
            _read_files(src, shard_files(run_dir) or sorted(run_dir.glob("*.jsonl")), problems)
            sources.append(src)
    _unique_methods(sources)
    loaded = Loaded(sources=sources, problems=problems, report=report,
                    root=", ".join(str(p) for p in paths))
    if loaded.episodes == 0:
        where = loaded.root
        if problems:
            raise UserError(f"{where}: no trajectories ({len(problems)} bad line(s), the first: {problems[0]})")
        if not any(s.files for s in sources):
            raise UserError(f"{where}: no trajectories (no .jsonl files or run directories found); "
                            "pass a trajectory JSONL file, a generate run directory or an eval directory")
        raise UserError(f"{where}: no trajectories (the files are empty)")
    return loaded


def _method_names(root: Path, run_dirs: list[Path]) -> list[str]:
    """Each run directory's path under `root`, less the folders they all share:
    EVAL/runs/base and EVAL/runs/tuned are `base` and `tuned` (the eval's method names)."""
    parts = [run_dir.relative_to(root).parts for run_dir in run_dirs]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def _unique_methods(sources: list[Source]) -> None:
    """Two sources with one name (two `run` directories given) become `run`, `run#2`."""
    seen: dict[str, int] = {}
    for src in sources:
        count = seen.get(src.method, 0) + 1
        seen[src.method] = count
        if count > 1:
            src.method = f"{src.method}#{count}"

