"""`rlm-train grpo --recipe R [KEY=VALUE ...] [--dry-run | --vllm-command]`."""

from __future__ import annotations

import argparse
import json

from rlm_train.stage import Output, Plan, Stage, add_stage_arguments, plan_notes, prepare
from rlm_train.train.grpo_config import GRPOConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=True, config_name="GRPOConfig", example="training.max_steps=10")
    parser.add_argument("--vllm-command", action="store_true",
                        help="print only the `vllm serve` command this recipe's rollouts need (for slurm/grpo.sbatch)")


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    from rlm_train.config import load_config

    return load_config(GRPOConfig, args.recipe, args.overrides)


def plan(cfg: GRPOConfig, source: str = "config") -> Plan:
    from rlm_train.train.grpo import check_training_arguments
    from rlm_train.train.grpo import plan as describe
    from rlm_train.train.grpo_config import check_config

    check_config(cfg, source)
    # What TRL would refuse on the GPU node fails in every plan: a dry run, a pipeline's, a launch's.
    check_training_arguments(cfg, source)
    inputs = {"model": cfg.model, "adapter": cfg.adapter, "prompts": cfg.prompts}
    return Plan(inputs={k: v for k, v in inputs.items() if v},
                outputs=[Output("output_dir", cfg.output_dir, "dir", "output_dir")],
                notes=plan_notes(describe(cfg, source)))


def main(args: argparse.Namespace) -> int:
    from rlm_train.errors import UserError
    from rlm_train.train.grpo import run_grpo, vllm_serve_command
    from rlm_train.train.grpo_config import check_config

    cfg = config_from_args(args)
    if args.vllm_command:
        check_config(cfg, args.recipe)
        if cfg.rollout.backend != "vllm_server":
            raise UserError(f"{args.recipe}: rollout.backend is {cfg.rollout.backend!r}; no vLLM server is needed")
        print(vllm_serve_command(cfg))
        return 0
    # The plan is printed before every run too: the log of a run starts with its resolved config.
    if prepare("grpo", args, cfg, plan(cfg, args.recipe), show_plan=True):
        return 0
    summary = run_grpo(cfg, source=args.recipe)  # leaves its process group when it ends
    print(json.dumps({k: summary.get(k) for k in ("global_step", "train_loss", "rewards", "output_dir")}, default=str))
    return summary["exit_code"]  # 128+N when a signal stopped it (checkpoint written; rerun resumes)


STAGE = Stage(name="grpo", config=GRPOConfig, add_arguments=add_arguments, config_from_args=config_from_args,
              plan=plan, main=main, slurm_template="grpo.sbatch")
