"""`rlm-train filter`: trajectories -> SFT dataset (one sample per root turn) + RL prompt set.

    rlm-train filter --trajectories runs/gen --out data/sft-niah
    rlm-train filter --recipe recipes/filter-paper.yaml max_turn_chars=8000

Priority: recipe < command-line flags < KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.stage import Kind, Output, add_stage_arguments, check_output, missing_inputs, prepare

# What run_filter writes under --out: (name, kind).
OUTPUTS: list[tuple[str, Kind]] = [("sft", "dir"), ("sft-train.jsonl", "file"), ("sft-validation.jsonl", "file"),
           ("rl", "dir"), ("rl-train.jsonl", "file"), ("rl-validation.jsonl", "file"), ("filter_report.json", "file")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=False, config_name="FilterConfig")
    parser.add_argument("--trajectories", action="append", default=[],
                        help="run directory of `rlm-train generate` or a trajectory JSONL file (repeatable)")
    parser.add_argument("--out", help="output directory (sft/, rl/, *.jsonl, filter_report.json)")
    parser.add_argument("--tasks", action="append", default=[],
                        help="task file(s) for the RL set and scoring (default: from the runs' manifests)")


def config_from_args(args: argparse.Namespace):
    from rlm_train.rollouts.filter import FilterConfig

    flags = {"trajectories": args.trajectories or None, "tasks": args.tasks or None, "out": args.out}
    return load_config(FilterConfig, args.recipe, args.overrides, flags=flags)


def main(args: argparse.Namespace) -> int:
    from rlm_train.rollouts.filter import format_report, run_filter

    config = config_from_args(args)
    # run_filter's own first checks, here too, so a dry run fails where a real run would.
    if not config.trajectories:
        raise UserError("no trajectories: pass --trajectories DIR (the --out of `rlm-train generate`)")
    if not config.out:
        raise UserError("no output directory: pass --out DIR or set `out` in the recipe")
    flag = "--out" if args.out else "out"
    outputs = [Output("out", config.out, "dir", flag),
               *(Output(name, str(Path(config.out) / name), kind, flag) for name, kind in OUTPUTS)]
    inputs = {"trajectories": config.trajectories, "tasks": config.tasks}
    notes = [] if config.tasks else ["tasks: the task files named in the runs' manifests"]
    missing = missing_inputs(inputs)
    notes += missing
    if args.dry_run and not missing:
        # What a real run would keep: a run that keeps nothing is warned about here too.
        from rlm_train.rollouts.filter import select

        for out in outputs:  # a bad output path first, as prepare() would
            check_output(out.path, out.kind, out.flag)

        chosen = select(config)
        dropped = ", ".join(f"{k} {n}" for k, n in chosen["dropped_episodes"].most_common()) or "none"
        notes.append(f"would keep {chosen['kept']} of {len(chosen['records'])} episodes (dropped: {dropped}): "
                     f"{len(chosen['samples'])} SFT samples, {len(chosen['rl_rows'])} RL prompts")
        if chosen["warning"]:
            notes.append(f"warning: {chosen['warning']}")
    if prepare("filter", args, config, inputs=inputs, outputs=outputs, notes=notes):
        return 0
    report = run_filter(config)
    print(format_report(report))
    return 0
