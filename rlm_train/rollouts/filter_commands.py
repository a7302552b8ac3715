"""`rlm-train filter`: trajectories -> SFT dataset (one sample per root turn) + RL prompt set.

    rlm-train filter --trajectories runs/gen --out data/sft-niah
    rlm-train filter --recipe recipes/filter-paper.yaml max_turn_chars=8000

Priority: recipe < command-line flags < KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
import json

from rlm_train.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", "--config", dest="recipe", help="YAML recipe of FilterConfig fields")
    parser.add_argument("--trajectories", action="append", default=[],
                        help="run directory of `rlm-train generate` or a trajectory JSONL file (repeatable)")
    parser.add_argument("--out", help="output directory (sft/, rl/, *.jsonl, filter_report.json)")
    parser.add_argument("--tasks", action="append", default=[],
                        help="task file(s) for the RL set and scoring (default: from the runs' manifests)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. min_turns=3")


def config_from_args(args: argparse.Namespace):
    from rlm_train.rollouts.filter import FilterConfig

    flags = {"trajectories": args.trajectories or None, "tasks": args.tasks or None, "out": args.out}
    return load_config(FilterConfig, args.recipe, args.overrides, flags=flags)


def main(args: argparse.Namespace) -> int:
    from rlm_train.rollouts.filter import format_report, run_filter

    config = config_from_args(args)
    if args.dry_run:
        print(json.dumps(config.model_dump(), indent=2))
        return 0
    report = run_filter(config)
    print(format_report(report))
    return 0
