"""The one list of `rlm-train` commands and pipeline stages; the CLI, `rlm-train pipeline` and
`rlm-train launch` all read it.

A command is a module with `add_arguments(parser)` and `main(args)`. A command that is also a
pipeline stage defines `STAGE` (a `rlm_train.stage.Stage`: its config class, flags, plan, Slurm
template) in that module, and its entry here names the stage. Modules are imported only when
their command runs, so `rlm-train --help` stays light.

Adding a stage is one entry in `BUILTIN` (and the module with its `STAGE`). A stage outside this
package is a module published under the `rlm_train.commands` entry-point group
(`NAME = package.module`): the same module shape, found the same way by every process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rlm_train.errors import UserError
from rlm_train.stage import Stage

ENTRY_POINT_GROUP = "rlm_train.commands"


@dataclass(frozen=True)
class Command:
    name: str
    """What follows `rlm-train`."""
    module: str
    """The module with add_arguments/main (and STAGE for a stage)."""
    help: str
    """One line for `rlm-train --help`."""
    stage: str | None = None
    """The pipeline stage it runs (`tasks make` for `tasks`), or None for a command that is no stage."""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


BUILTIN: tuple[Command, ...] = (
    Command("run", "rlm_train.rlm.commands", "run one RLM episode on a context file and print the answer"),
    Command("tasks", "rlm_train.tasks.commands", "make, show and score long-context task sets", stage="tasks make"),
    Command("generate", "rlm_train.rollouts.commands", "generate RLM trajectories concurrently (resumable)",
            stage="generate"),
    Command("filter", "rlm_train.rollouts.filter_commands", "filter trajectories into SFT and RL datasets",
            stage="filter"),
    Command("sft", "rlm_train.train.sft_commands", "supervised fine-tuning (TRL + PEFT) on per-turn samples", stage="sft"),
    Command("grpo", "rlm_train.train.grpo_commands", "GRPO with full RLM episodes in the sandbox as rollouts",
            stage="grpo"),
    Command("eval", "rlm_train.eval.commands",
            "evaluate methods on held-out tasks: report with CIs, paired diffs, plots", stage="eval"),
    Command("view", "rlm_train.viewer.commands",
            "trajectories as one self-contained HTML page (filters, timelines, sub-call trees)"),
    Command("serve", "rlm_train.serve.commands", "serve a model on vLLM (with LoRA adapters) and/or the RLM gateway",
            stage="serve"),
    Command("export", "rlm_train.export.commands",
            "the tuned model as GGUF (llama.cpp, Ollama), with its model card; --push-to-hub uploads it"),
    Command("pipeline", "rlm_train.pipeline.commands",
            "run a pipeline recipe's stages in order, skipping finished ones (resumable)"),
    Command("launch", "rlm_train.launch.commands",
            "submit a pipeline (or one stage recipe) as dependent Slurm jobs; --status shows them"),
    Command("config", "rlm_train.config_commands", "list every config key of a stage (type, default, doc)"),
    Command("bench", "rlm_train.bench", "benchmarks reported as ratios against a baseline in the same run"),
)


def _plugins() -> list[Command]:
    """Commands other packages publish under the `rlm_train.commands` entry-point group."""
    from importlib.metadata import entry_points

    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if any(point.name == builtin.name for builtin in BUILTIN):
            continue  # a plugin cannot replace a built-in command
        try:
            module = importlib.import_module(point.value)
        except ImportError as exc:  # a broken plugin must not break every command
            found.append(Command(point.name, point.value, f"(cannot be imported: {exc})"))
            continue
        stage = getattr(module, "STAGE", None)
        doc = (module.__doc__ or "").strip().splitlines()
        help_ = doc[0] if doc else point.value
        found.append(Command(point.name, point.value, help_, stage.name if isinstance(stage, Stage) else None))
    return found


def commands(plugins: bool = True) -> list[Command]:
    """Every command: the built-in ones, then (with `plugins`) the published ones."""
    return [*BUILTIN, *(_plugins() if plugins else [])]


def command(name: str) -> Command | None:
    """The command `name`, looking at the plugins only when no built-in command has that name."""
    for found in BUILTIN:
        if found.name == name:
            return found
    return next((found for found in _plugins() if found.name == name), None)


def stage_names() -> list[str]:
    """Every pipeline stage's name (`tasks make`, `generate`, ...)."""
    return [found.stage for found in commands() if found.stage]


def stage(name: str) -> Stage:
    """The stage a pipeline's `run:` names; a UserError listing the stages when there is none."""
    name = " ".join(str(name).split())
    found = next((c for c in commands() if c.stage == name), None)
    if found is None:
        raise UserError(f"unknown stage {name!r}; choose from {', '.join(stage_names())}")
    module: Any = found.load()
    defined = getattr(module, "STAGE", None)
    if not isinstance(defined, Stage) or defined.name != name:
        raise UserError(f"{found.module}: defines no STAGE named {name!r} (rlm_train/registry.py lists it)")
    return defined
