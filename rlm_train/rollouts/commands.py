"""`rlm-train generate`: RLM trajectories for a task file, concurrently and resumably.

    rlm-train generate --tasks data/tasks/niah.jsonl --policy scripted --samples 4 --out runs/gen
    rlm-train generate --recipe recipes/generate-vllm.yaml rlm.max_iterations=6

Priority: recipe < command-line flags < KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.rlm.commands import add_policy_arguments, client_flags
from rlm_train.rollouts.generate import GenerateConfig
from rlm_train.stage import Note, NoteKind, Output, Plan, Stage, add_stage_arguments, info, missing_inputs, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=False, config_name="GenerateConfig", example="rlm.max_iterations=6")
    parser.add_argument("--tasks", help="task file (rlm-train/task/v1 JSONL)")
    parser.add_argument("--out", help="run directory; re-running the same command there resumes")
    add_policy_arguments(parser, required=False)  # the policy may come from the recipe instead
    parser.add_argument("--samples", type=int, help="episodes per task (default 1)")
    parser.add_argument("--concurrency", type=int, help="episodes in flight at once (default 32)")
    parser.add_argument("--skip-bad-lines", action="store_true", default=None,
                        help="skip (and report) bad task lines instead of stopping at the first")
    parser.add_argument("--shard", help="I/N: take every N-th task starting at I (e.g. a Slurm array task)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    flags = {
        "tasks": args.tasks,
        "out": args.out,
        "policy": args.policy,
        "sub_policy": args.sub_policy,
        "base_urls": args.base_url or None,
        "sub_base_urls": args.sub_base_url or None,
        **client_flags(args),
        "samples": args.samples,
        "concurrency": args.concurrency,
        "skip_bad_lines": args.skip_bad_lines,
        "progress": args.progress,
    }
    if args.shard:
        index, _, count = args.shard.partition("/")
        if not (index.isdigit() and count.isdigit()):
            raise UserError(f"--shard {args.shard!r}: expected I/N, e.g. --shard 0/4")
        flags["shard_index"], flags["num_shards"] = int(index), int(count)
    return load_config(GenerateConfig, args.recipe, args.overrides, flags=flags)


def plan(config: GenerateConfig) -> Plan:
    from rlm_train.policies.spec import parse_policy_spec
    from rlm_train.rollouts import store
    from rlm_train.rollouts.generate import check_config
    from rlm_train.rollouts.tracking import describe_tracking

    check_config(config)  # so a dry run fails where a real run would
    assert config.out is not None  # for the type checker: check_config refused None
    for spec in (config.policy, config.sub_policy):
        if spec:
            parse_policy_spec(spec)
    inputs = {"tasks": config.tasks, "policy": config.policy, "sub_policy": config.sub_policy,
              "base_urls": config.base_urls, "sub_base_urls": config.sub_base_urls}
    resuming = (Path(config.out) / store.MANIFEST).is_file()
    run = Note(NoteKind.RESUME if resuming else NoteKind.INFO,
               f"{config.out}: {'has a run; this resumes it' if resuming else 'new run'}"
               f" (shard {config.shard_index} of {config.num_shards})")
    return Plan(inputs={k: v for k, v in inputs.items() if v}, outputs=[Output("run_dir", config.out, "dir", "out")],
                notes=[run, *missing_inputs({"tasks": config.tasks}), *info(describe_tracking(config, config.out))])


def main(args: argparse.Namespace) -> int:
    from rlm_train.rollouts.generate import format_summary, run_generate

    config = config_from_args(args)
    if prepare("generate", args, config, plan(config).relabel({"out": "--out"} if args.out else {})):
        return 0
    from rlm_train.rollouts.progress import Stopped

    try:
        summary = run_generate(config)
    except Stopped as stopped:  # SIGINT or SIGTERM: finished episodes and the summary are saved
        print(f"rlm-train generate: {stopped.message}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"stopped; finished episodes are saved in {config.out}. Re-run the same command to resume.",
              file=sys.stderr)
        raise
    print(format_summary(summary))
    return 0


STAGE = Stage(name="generate", config=GenerateConfig, add_arguments=add_arguments, config_from_args=config_from_args,
              plan=plan, main=main, slurm_template="generate.sbatch")
