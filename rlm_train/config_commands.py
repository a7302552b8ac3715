"""`rlm-train config STAGE`: every config key of a stage, with its type, default and doc.

    rlm-train config sft
    rlm-train config tasks      # the `tasks make --recipe` suite keys
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", metavar="STAGE", help="a stage command: generate, filter, sft, grpo, eval, serve, tasks, ...")


def main(args: argparse.Namespace) -> int:
    from rlm_train import registry
    from rlm_train.config_help import format_config_keys
    from rlm_train.errors import UserError

    found = registry.command(args.stage)
    name = found.stage if found is not None and found.stage else args.stage
    if found is None or not found.stage:
        raise UserError(f"config {args.stage!r}: not a stage command; choose from {', '.join(registry.stage_names())}")
    stage = registry.stage(name)
    print(format_config_keys(stage.config, stage.name))
    return 0
