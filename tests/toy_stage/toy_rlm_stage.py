"""toy: a stage added through the registry alone (tests/test_stage_registry.py): it copies a
text file upper-cased. Published under the `rlm_train.commands` entry-point group by a
dist-info directory the test writes; nothing in rlm_train names it."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlm_train.config import StrictModel, load_config
from rlm_train.formats import write_text_atomic
from rlm_train.stage import Output, Plan, Stage, add_stage_arguments, missing_inputs, prepare


class ToyConfig(StrictModel):
    source: str
    """The text file to read."""
    out: str = "toy-out.txt"
    """Where its upper-cased copy goes."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=True, config_name="ToyConfig", example="out=copy.txt")


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    return load_config(ToyConfig, args.recipe, args.overrides)


def plan(config: ToyConfig) -> Plan:
    return Plan(inputs={"source": config.source}, outputs=[Output("copy", config.out, "file", "out")],
                notes=missing_inputs({"source": config.source}))


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if prepare("toy", args, config, plan(config)):
        return 0
    write_text_atomic(config.out, Path(config.source).read_text().upper())
    print(f"toy: wrote {config.out}")
    return 0


STAGE = Stage(name="toy", config=ToyConfig, add_arguments=add_arguments, config_from_args=config_from_args, plan=plan,
              main=main, slurm_template="stage.sbatch")
