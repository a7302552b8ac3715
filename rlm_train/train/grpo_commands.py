"""`rlm-train grpo --recipe R [KEY=VALUE ...] [--dry-run | --vllm-command]`."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", "--config", dest="recipe", required=True, help="GRPO recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. training.max_steps=10 rlm.max_iterations=3")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config and print the plan without loading or training anything")
    parser.add_argument("--vllm-command", action="store_true",
                        help="print only the `vllm serve` command this recipe's rollouts need (for slurm/grpo.sbatch)")


def main(args: argparse.Namespace) -> int:
    from rlm_train.config import load_config
    from rlm_train.errors import UserError
    from rlm_train.train.grpo import plan, run_grpo, vllm_serve_command
    from rlm_train.train.grpo_config import GRPOConfig, check_config

    cfg = load_config(GRPOConfig, args.recipe, args.overrides)
    check_config(cfg, args.recipe)
    if args.vllm_command:
        if cfg.rollout.backend != "vllm_server":
            raise UserError(f"{args.recipe}: rollout.backend is {cfg.rollout.backend!r}; no vLLM server is needed")
        print(vllm_serve_command(cfg))
        return 0
    print(plan(cfg, args.recipe), flush=True)
    if args.dry_run:
        return 0
    summary = run_grpo(cfg, source=args.recipe)
    print(json.dumps({k: summary.get(k) for k in ("global_step", "train_loss", "rewards", "output_dir")}, default=str))
    return 0
