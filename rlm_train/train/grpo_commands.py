"""`rlm-train grpo --recipe R [KEY=VALUE ...] [--dry-run | --vllm-command]`."""

from __future__ import annotations

import argparse
import json

from rlm_train.stage import Output, add_stage_arguments, plan_notes, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=True, config_name="GRPOConfig")
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
    inputs = {"model": cfg.model, "adapter": cfg.adapter, "prompts": cfg.prompts}
    # The plan is printed before every run too: the log of a run starts with its resolved config.
    if prepare("grpo", args, cfg, inputs=inputs, outputs=[Output("output_dir", cfg.output_dir, "dir", "output_dir")],
               notes=plan_notes(plan(cfg, args.recipe)), show_plan=True):
        return 0
    from rlm_train.train.common import leave_process_group

    try:
        summary = run_grpo(cfg, source=args.recipe)
        print(json.dumps({k: summary.get(k) for k in ("global_step", "train_loss", "rewards", "output_dir")},
                         default=str))
    finally:
        leave_process_group()
    return summary["exit_code"]  # 128+N when a signal stopped it (checkpoint written; rerun resumes)
