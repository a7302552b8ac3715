"""A stage's own `--dry-run` plan, read back: what it reads (`inputs`) and writes (`outputs`).

Every stage command prints the same plan (rlm_train.stage.format_plan): a header line, then
YAML. The pipeline runs the command in-process with its output captured, so it learns a
stage's outputs from the stage itself and never keeps a second copy of each command's paths.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlm_train.pipeline.recipe import Stage


@dataclass
class Plan:
    """A stage's plan; `error` is the command's own one-line error when it could not plan."""

    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def output_paths(self) -> list[str]:
        return [str(path) for path in self.outputs.values() if path]


def parse_plan(text: str) -> Plan | None:
    """The plan in a command's stdout (the YAML after the `rlm-train ... plan (...)` line)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("rlm-train ") and " plan (" in line:
            try:
                data = yaml.safe_load("\n".join(lines[index + 1:]))
            except yaml.YAMLError:
                return None
            if not isinstance(data, dict):
                return None
            notes = str(data.get("notes") or "").splitlines()
            return Plan(inputs=dict(data.get("inputs") or {}), outputs={k: str(v) for k, v in (data.get("outputs") or {}).items()},
                        notes=[n for n in notes if n.strip()])
    return None


def stage_plan(stage: Stage, recipe_file: str | os.PathLike[str] | None = None, *, isolated: bool = False) -> Plan:
    """Run `rlm-train RUN --recipe FILE --dry-run` and read its plan: in-process (fast; the dry
    run's imports stay in this process), or with `isolated` in a subprocess (what a long-lived
    pipeline uses, so torch is not held in memory while the stages run). Without `recipe_file`
    the stage's config goes to a temporary file (nothing under out_dir is written)."""
    with contextlib.ExitStack() as stack:
        if recipe_file is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rlm-pipeline-plan-"))
            recipe_file = Path(tmp) / f"{stage.name}.yaml"
            Path(recipe_file).write_text(stage.config_text)
        argv = [*stage.run.split(), "--recipe", str(recipe_file), "--dry-run"]
        try:
            code, out, err = _run_isolated(argv) if isolated else _run_in_process(argv)
        except Exception as exc:  # a bug in one stage's planning must not stop the others' plans
            return Plan(error=f"{type(exc).__name__}: {exc}")
    plan = parse_plan(out) if code == 0 else None
    if plan is None:
        reason = [line for line in err.splitlines() if line.strip() and not line.startswith("dry run:")]
        return Plan(error=(reason[-1] if reason else f"its --dry-run exited with status {code} and printed no plan"))
    return plan


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
    from rlm_train import cli

    out, err = io.StringIO(), io.StringIO()
    environ = dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        if dict(os.environ) != environ:  # a plan must not change what the stages inherit
            os.environ.clear()
            os.environ.update(environ)
    return code, out.getvalue(), err.getvalue()


def _run_isolated(argv: list[str]) -> tuple[int, str, str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rlm_train.cli", *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600, start_new_session=True)
    return done.returncode, done.stdout, done.stderr
