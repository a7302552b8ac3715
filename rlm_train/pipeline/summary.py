"""The pipeline's own report, written after its stages: OUT_DIR/report.md (per-stage timings,
then each eval stage's report with its plots) and OUT_DIR/viewer.html (every episode the eval
stages ran, in one page). It is rebuilt on every run, so it always matches what is on disk."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlm_train.eval.config import EvalConfig
from rlm_train.formats import write_text_atomic
from rlm_train.pipeline.recipe import Pipeline
from rlm_train.pipeline.state import is_finished, read_state

_LINK = re.compile(r"(\]\()(?!https?://|/|#)([^)]+\))")


def eval_dirs(pipeline: Pipeline) -> list[tuple[str, Path]]:
    """(stage name, out directory) of every eval stage finished with today's config and code. The
    report of an eval whose config, or an upstream stage's, changed since stays out (it is moved
    aside when that eval reruns), so the tables never show results of another config."""
    fingerprints = pipeline.fingerprints()
    found = []
    for stage in pipeline.stages:
        out = stage.config.out if isinstance(stage.config, EvalConfig) else None
        if not out or not (Path(out) / "report.md").is_file():
            continue
        if is_finished(read_state(pipeline, stage), fingerprints[stage.name]):
            found.append((stage.name, Path(out)))
    return found


def _relinked(markdown: str, prefix: str) -> str:
    """Relative links and images of a report moved under `prefix` (its directory seen from OUT_DIR)."""
    return _LINK.sub(lambda m: f"{m.group(1)}{prefix}/{m.group(2)}", markdown)


def write_summary(pipeline: Pipeline, timings_table: str) -> list[Path]:
    """Write OUT_DIR/report.md and, when an eval stage ran, OUT_DIR/viewer.html; returns what was
    written. Each eval report's top heading becomes a section of this one."""
    out_dir = pipeline.out_dir
    evals = eval_dirs(pipeline)
    parts = [f"# {pipeline.name}", "", f"Recipe: `{pipeline.path}`. Stage recipes: `{pipeline.state_dir}/`.", "",
             "## Stages", "", "```", timings_table.strip(), "```", ""]
    for name, directory in evals:
        prefix = os.path.relpath(directory, out_dir)
        text = (directory / "report.md").read_text()
        text = re.sub(r"^# ", "### ", text, count=1, flags=re.MULTILINE)
        parts += [f"## Stage {name} (`{directory}/report.md`)", "", _relinked(text, prefix).strip(), ""]
    written = [out_dir / "report.md"]
    write_text_atomic(written[0], "\n".join(parts) + "\n")
    if evals:
        from rlm_train.viewer.load import load
        from rlm_train.viewer.page import render_page

        loaded = load([str(directory) for _, directory in evals])
        page = render_page(loaded, title=f"{pipeline.name}: eval episodes", max_chars=20_000)
        written.append(out_dir / "viewer.html")
        write_text_atomic(written[1], page.html)
    return written


def results_tables(pipeline: Pipeline) -> str:
    """The score tables of the eval reports (their first table each), to print at the end."""
    out = []
    for name, directory in eval_dirs(pipeline):
        lines = (directory / "report.md").read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
        if start is None:
            continue
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        out += [f"results of stage {name} ({directory}/report.md):", *lines[start:end], ""]
    return "\n".join(out)
