"""`rlm-train sft --recipe R [KEY=VALUE ...] [--dry-run]`."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", "--config", dest="recipe", required=True, help="SFT recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. training.max_steps=10 lora.r=8")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and print the plan without loading or training anything")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (metrics.jsonl still written)")


def main(args: argparse.Namespace) -> int:
    from rlm_train.config import load_config
    from rlm_train.train.sft import SFTConfig, plan, run_sft

    cfg = load_config(SFTConfig, args.recipe, args.overrides)
    print(plan(cfg, args.recipe), flush=True)
    if args.dry_run:
        return 0
    summary = run_sft(cfg, source=args.recipe, quiet=args.quiet)
    print(json.dumps({k: summary[k] for k in ("global_step", "train_loss", "tokens_per_s", "output_dir")}, default=str))
    return 0
