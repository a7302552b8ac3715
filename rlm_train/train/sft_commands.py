"""`rlm-train sft --recipe R [KEY=VALUE ...] [--dry-run]`."""

from __future__ import annotations

import argparse
import json

from rlm_train.stage import Output, Plan, Stage, add_stage_arguments, plan_notes, prepare
from rlm_train.train.sft import SFTConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=True, config_name="SFTConfig", example="training.max_steps=10")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (metrics.jsonl still written)")


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    from rlm_train.config import load_config

    return load_config(SFTConfig, args.recipe, args.overrides)


def plan(cfg: SFTConfig, source: str = "config") -> Plan:
    from rlm_train.train.sft import check_dataset_not_empty, check_training_arguments
    from rlm_train.train.sft import plan as describe

    check_dataset_not_empty(cfg)  # filter kept nothing: say so before a plan, a model or a GPU
    # What TRL would refuse on the GPU node fails in every plan: a dry run, a pipeline's, a launch's.
    check_training_arguments(cfg, source)
    inputs: dict[str, str | list[str]] = {"model": cfg.model, "dataset": cfg.dataset}
    if cfg.resume not in ("auto", "never"):
        inputs["resume"] = cfg.resume
    return Plan(inputs=inputs, outputs=[Output("output_dir", cfg.output_dir, "dir", "output_dir")],
                notes=plan_notes(describe(cfg, source)))


def main(args: argparse.Namespace) -> int:
    from rlm_train.train.sft import run_sft

    cfg = config_from_args(args)
    # The plan is printed before every run too: the log of a run starts with its resolved config.
    if prepare("sft", args, cfg, plan(cfg, args.recipe), show_plan=True):
        return 0
    from rlm_train.train.common import main_print

    summary = run_sft(cfg, source=args.recipe, quiet=args.quiet)  # leaves its process group when it ends
    main_print(json.dumps({k: summary[k] for k in ("global_step", "train_loss", "tokens_per_s", "output_dir")},
                          default=str))
    return summary["exit_code"]  # 128+N when a signal stopped it (checkpoint written; rerun resumes)


STAGE = Stage(name="sft", config=SFTConfig, add_arguments=add_arguments, config_from_args=config_from_args, plan=plan,
              main=main, slurm_template="sft.sbatch")
