"""What the pipeline remembers between runs, under OUT_DIR.

    OUT_DIR/pipeline/STAGE.state.json   fingerprint, status, started/finished, exit code, outputs
    OUT_DIR/pipeline/stale/STAGE-TIME/  outputs of an earlier config, moved aside before a rerun
    OUT_DIR/timings.json                per stage: this run's status and time, the last full run's time

A stage is finished when its state says `done` with today's fingerprint and its outputs exist.
A state written by an older rlm-train (no `fingerprint_scheme`, or another one) holds a fingerprint
of another kind: its stage is not finished, and the run says why; `--keep STAGE` reuses its outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.pipeline.recipe import FINGERPRINT_SCHEME, Pipeline, PipelineStage


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}); delete it to start that stage afresh") from None
    return data if isinstance(data, dict) else None


def state_file(pipeline: Pipeline, stage: PipelineStage) -> Path:
    return pipeline.state_dir / f"{stage.name}.state.json"


def read_state(pipeline: Pipeline, stage: PipelineStage) -> dict[str, Any] | None:
    return _read_json(state_file(pipeline, stage))


def write_state(pipeline: Pipeline, stage: PipelineStage, state: dict[str, Any]) -> None:
    _write_json(state_file(pipeline, stage), state)


def missing_outputs(state: dict[str, Any]) -> list[str]:
    return [str(p) for p in (state.get("outputs") or {}).values() if p and not Path(str(p)).expanduser().exists()]


def is_finished(state: dict[str, Any] | None, fingerprint: str) -> bool:
    """Finished before with this config (and everything upstream), and its outputs are all there."""
    return bool(state and state.get("status") == "done" and state.get("fingerprint") == fingerprint
                and not missing_outputs(state))


def other_scheme(state: dict[str, Any] | None) -> bool:
    """The state's fingerprint was computed another way (an older rlm-train wrote it)."""
    return bool(state) and (state or {}).get("fingerprint_scheme", 1) != FINGERPRINT_SCHEME


def has_outputs(state: dict[str, Any] | None) -> bool:
    """Finished (with whatever fingerprint) and every output still there: what `--keep` can reuse."""
    return bool(state and state.get("status") == "done" and not missing_outputs(state))


def _outermost(paths: list[str]) -> list[Path]:
    """The paths that are not inside another of them (moving those moves the rest)."""
    resolved = sorted({Path(p).expanduser().resolve() for p in paths if p}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in resolved:
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return kept


def move_aside(pipeline: Pipeline, stage: PipelineStage, outputs: list[str]) -> Path | None:
    """Move the stage's existing outputs into OUT_DIR/pipeline/stale/STAGE-TIME/ (their relative
    paths kept), so a rerun with another config never mixes with them. Returns that directory,
    or None when none of them exists. Refuses (UserError) an output that holds the pipeline's
    own state or the working directory."""
    existing = [p for p in _outermost(outputs) if p.exists() or p.is_symlink()]
    if not existing:
        return None
    state_dir = pipeline.state_dir.resolve()
    cwd = Path.cwd().resolve()
    for path in existing:
        if path == state_dir or path in state_dir.parents or path == cwd or path in cwd.parents:
            raise UserError(f"stage {stage.name} writes to {path}, which holds the pipeline's state (out_dir "
                            f"{pipeline.out_dir}) or the working directory; give the stage an output path of its own")
    target = state_dir / "stale" / f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    for path in existing:
        try:
            relative = path.relative_to(cwd)
        except ValueError:
            relative = Path(*path.parts[1:])  # outside the working directory: keep its absolute layout
        dest = target / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(dest))
    return target


class Timings:
    """OUT_DIR/timings.json: per stage, this run's status and seconds, and the seconds of its
    last full run (kept when a later run skips it), which the time-left estimates use."""

    def __init__(self, pipeline: Pipeline):
        self.path = pipeline.out_dir / "timings.json"
        self.name = pipeline.name
        old = _read_json(self.path) if self.path.is_file() else None
        previous = (old or {}).get("stages") or {}
        self.last_full: dict[str, float] = {name: float(entry["last_full_run_s"]) for name, entry in previous.items()
                                            if isinstance(entry, dict) and entry.get("last_full_run_s") is not None}
        self.this_run: dict[str, dict[str, Any]] = {}
        # The total is this run's wall time: background servers overlap the stages they serve.
        self.started = time.monotonic()

    def record(self, stage: str, status: str, seconds: float | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"status": status}
        if seconds is not None:
            entry["seconds"] = round(seconds, 2)
            if status == "done":
                self.last_full[stage] = round(seconds, 2)
        entry.update(extra)
        self.this_run[stage] = entry

    def estimate(self, stages: list[str]) -> tuple[float, list[str]]:
        """Seconds the given stages took last time, and the stages with no timing yet."""
        known = [self.last_full[s] for s in stages if s in self.last_full]
        return sum(known), [s for s in stages if s not in self.last_full]

    def write(self, order: list[str]) -> None:
        stages = {}
        for name in order:
            entry = dict(self.this_run.get(name) or {"status": "not run"})
            if name in self.last_full:
                entry["last_full_run_s"] = self.last_full[name]
            stages[name] = entry
        total = time.monotonic() - self.started
        _write_json(self.path, {"pipeline": self.name, "written": now_iso(), "this_run_s": round(total, 2),
                                "stages": stages})

    def table(self, order: list[str]) -> str:
        rows = [("stage", "this run", "time", "last full run")]
        for name in order:
            entry = self.this_run.get(name) or {"status": "not run"}
            seconds = entry.get("seconds")
            rows.append((name, str(entry["status"]), format_duration(seconds) if seconds is not None else "-",
                         format_duration(self.last_full[name]) if name in self.last_full else "-"))
        rows.append(("total (wall)", "", format_duration(time.monotonic() - self.started), ""))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def ensure_writable(pipeline: Pipeline) -> None:
    from rlm_train.stage import check_output

    check_output(str(pipeline.state_dir), "dir", "out_dir")
    if pipeline.out_dir.exists() and not os.access(pipeline.out_dir, os.W_OK):
        raise UserError(f"out_dir {pipeline.out_dir}: cannot write there; pick another out_dir")
