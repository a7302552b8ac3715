"""A stage's plan (rlm_train.stage.Plan: what it reads, writes and notes), got two ways:

- `plan_here`: the stage's `plan(config)` on its typed config, in this process (no side effects,
  no heavy imports: what dry runs and `rlm-train launch` use);
- `plan_isolated`: `rlm-train RUN --recipe FILE --plan-json` in a subprocess, read back as JSON
  (what a long-lived pipeline uses before it runs anything: the command's own checks, in a process
  of its own, so nothing it imports stays in the pipeline's memory).

Both raise a one-line UserError when the stage cannot plan.
"""

from __future__ import annotations

import subprocess
import sys

from rlm_train.errors import UserError
from rlm_train.pipeline.recipe import PipelineStage
from rlm_train.stage import Plan


def plan_here(stage: PipelineStage) -> Plan:
    return stage.definition.plan(stage.config)


def plan_isolated(stage: PipelineStage, timeout_s: float = 600) -> Plan:
    """The plan of the command the stage runs, from its written recipe (stage.recipe_file)."""
    done = subprocess.run([sys.executable, "-m", "rlm_train.cli", *stage.argv, "--plan-json"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout_s, start_new_session=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else f"its --plan-json exited with status {done.returncode}")
    try:
        return Plan.from_json(done.stdout)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"its --plan-json printed no JSON plan (status {done.returncode})") from None
