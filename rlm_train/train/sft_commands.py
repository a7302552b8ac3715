"""`rlm-train sft --recipe R [KEY=VALUE ...] [--dry-run]`."""

from __future__ import annotations

import argparse
import json

from rlm_train.stage import Output, add_stage_arguments, plan_notes, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=True, config_name="SFTConfig")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (metrics.jsonl still written)")


def main(args: argparse.Namespace) -> int:
    from rlm_train.config import load_config
    from rlm_train.train.sft import SFTConfig, check_dataset_not_empty, plan, run_sft

    cfg = load_config(SFTConfig, args.recipe, args.overrides)
    check_dataset_not_empty(cfg)  # filter kept nothing: say so before a plan, a model or a GPU
    inputs = {"model": cfg.model, "dataset": cfg.dataset}
    if cfg.resume not in ("auto", "never"):
        inputs["resume"] = cfg.resume
    # The plan is printed before every run too: the log of a run starts with its resolved config.
    if prepare("sft", args, cfg, inputs=inputs, outputs=[Output("output_dir", cfg.output_dir, "dir", "output_dir")],
               notes=plan_notes(plan(cfg, args.recipe)), show_plan=True):
        return 0
    from rlm_train.train.common import leave_process_group, main_print

    try:
        summary = run_sft(cfg, source=args.recipe, quiet=args.quiet)
        main_print(json.dumps({k: summary[k] for k in ("global_step", "train_loss", "tokens_per_s", "output_dir")},
                              default=str))
    finally:
        leave_process_group()
    return summary["exit_code"]  # 128+N when a signal stopped it (checkpoint written; rerun resumes)
