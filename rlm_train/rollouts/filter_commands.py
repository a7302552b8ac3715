"""`rlm-train filter`: trajectories -> SFT dataset (one sample per root turn) + RL prompt set.

    rlm-train filter --trajectories runs/gen --out data/sft-niah
    rlm-train filter --recipe recipes/filter-paper.yaml max_turn_chars=8000
    rlm-train filter --trajectories runs/gen-rl --out data/rl-set rl_only=true sft_data=[data/sft-niah/sft]

Priority: recipe < command-line flags < KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.rollouts.filter import FilterConfig
from rlm_train.stage import (Kind, Note, NoteKind, Output, Plan, Stage, add_stage_arguments, check_output, info,
                             missing_inputs, prepare)

# What run_filter writes under --out: (name, kind); with rl_only, the SFT ones are not written.
SFT_OUTPUTS: list[tuple[str, Kind]] = [("sft", "dir"), ("sft-train.jsonl", "file"), ("sft-validation.jsonl", "file")]
RL_OUTPUTS: list[tuple[str, Kind]] = [("rl", "dir"), ("rl-train.jsonl", "file"), ("rl-validation.jsonl", "file"),
                                      ("filter_report.json", "file")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=False, config_name="FilterConfig", example="min_turns=2")
    parser.add_argument("--trajectories", action="append", default=[],
                        help="run directory of `rlm-train generate` or a trajectory JSONL file (repeatable)")
    parser.add_argument("--out", help="output directory (sft/, rl/, *.jsonl, filter_report.json)")
    parser.add_argument("--tasks", action="append", default=[],
                        help="task file(s) for the RL set and scoring (default: from the runs' manifests)")


def config_from_args(args: argparse.Namespace) -> FilterConfig:
    flags = {"trajectories": args.trajectories or None, "tasks": args.tasks or None, "out": args.out}
    return load_config(FilterConfig, args.recipe, args.overrides, flags=flags)


def plan(config: FilterConfig) -> Plan:
    # run_filter's own first checks, here too, so a dry run fails where a real run would.
    if not config.trajectories:
        raise UserError("no trajectories: pass --trajectories DIR (the --out of `rlm-train generate`)")
    if not config.out:
        raise UserError("no output directory: pass --out DIR or set `out` in the recipe")
    outputs = [Output("out", config.out, "dir", "out"),
               *(Output(name, str(Path(config.out) / name), kind, "out")
                 for name, kind in (RL_OUTPUTS if config.rl_only else SFT_OUTPUTS + RL_OUTPUTS))]
    inputs = {"trajectories": config.trajectories, "tasks": config.tasks, "sft_data": config.sft_data}
    notes = [] if config.tasks else info("tasks: the task files named in the runs' manifests")
    return Plan(inputs={k: v for k, v in inputs.items() if v}, outputs=outputs,
                notes=notes + missing_inputs(inputs))


def selection_notes(config: FilterConfig) -> list[Note]:
    """What a real run would keep (it reads every trajectory): a run that keeps nothing is
    refused here too. Only the command's own dry run looks; a pipeline's plan does not."""
    from rlm_train.rollouts.filter import select
    from rlm_train.rollouts.subcall_samples import SUB_CALL

    chosen = select(config)
    if config.rl_only and not chosen["rl_rows"]:
        raise UserError(chosen["warning"])  # as run_filter would
    dropped = ", ".join(f"{k} {n}" for k, n in chosen["dropped_episodes"].most_common()) or "none"
    dropped_rl = ", ".join(f"{k} {n}" for k, n in chosen["dropped_rl"].most_common()) or "none"
    sub_calls = sum(s.kind == SUB_CALL for s in chosen["samples"])
    of_them = f" ({sub_calls} of them sub-calls)" if config.sub_calls.enabled else ""
    notes = info(f"would keep {len(chosen['rl_rows'])} RL prompts (tasks dropped: {dropped_rl})" if config.rl_only
                 else f"would keep {chosen['kept']} of {len(chosen['records'])} episodes (dropped: {dropped}): "
                      f"{len(chosen['samples'])} SFT samples{of_them}, {len(chosen['rl_rows'])} RL prompts")
    if config.rl_only and chosen["from_train_split"]:
        notes.append(Note(NoteKind.WARNING, f"warning: {chosen['from_train_split']} RL tasks come from the train corpus "
                                            "split, which SFT's tasks draw from; make RL tasks with `rl:` counts in the "
                                            "suite recipe"))
    if chosen["warning"]:
        notes.append(Note(NoteKind.WARNING, f"warning: {chosen['warning']}"))
    return notes


def main(args: argparse.Namespace) -> int:
    from rlm_train.rollouts.filter import run_filter

    config = config_from_args(args)
    planned = plan(config).relabel({"out": "--out"} if args.out else {})
    if args.dry_run and not any(note.kind == NoteKind.MISSING_INPUT for note in planned.notes):
        for out in planned.outputs:  # a bad output path first, as prepare() would
            check_output(out.path, out.kind, out.flag)
        planned.notes += selection_notes(config)
    if prepare("filter", args, config, planned):
        return 0
    report = run_filter(config)
    print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    inputs, episodes, turns = report["inputs"], report["episodes"], report["turns"]
    bad = inputs.get("bad_lines") or []
    bad_tasks = inputs.get("bad_task_lines") or []
    lines = [f"{inputs['trajectories']} trajectories read from {inputs['files']} files"
             + (f" ({inputs['torn_lines']} torn lines skipped)" if inputs["torn_lines"] else "")
             + (f" ({inputs['duplicate_records']} duplicate records skipped)" if inputs["duplicate_records"] else "")]
    if bad:
        lines.append(f"{len(bad)} corrupt trajectory lines skipped: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if bad_tasks:
        lines.append(f"{len(bad_tasks)} bad task-file lines skipped (as generate did): "
                     f"{bad_tasks[0].partition(': ')[0]}{' ...' if len(bad_tasks) > 1 else ''}")
    sft, rl = report["sft"], report["rl"]
    rl_only = "sft" not in report["outputs"]
    lines += ["", f"{'rule':<34}{'dropped':>9}"]
    if not rl_only:
        for reason, n in episodes["dropped"].items():
            lines.append(f"{'episode: ' + reason:<34}{n:>9}")
        lines.append(f"{'episodes kept':<34}{episodes['kept']:>9}")
        for reason, n in turns["dropped"].items():
            lines.append(f"{'turn: ' + reason:<34}{n:>9}")
        lines.append(f"{'SFT samples (one per turn)':<34}{turns['samples']:>9}")
        repairs = report["repairs"]
        for name, n in repairs.items():
            if name not in ("samples_repaired", "fraction_repaired"):
                lines.append(f"{'repaired: ' + name:<34}{n:>9}")
        lines.append(f"{'samples repaired':<34}{repairs['samples_repaired']:>9}  ({repairs['fraction_repaired']:.1%})")
        sub_calls = report.get("sub_calls") or {}
        if sub_calls.get("enabled"):
            for reason, n in sub_calls["dropped"].items():
                lines.append(f"{'sub-call: ' + reason:<34}{n:>9}")
            answered = ", ".join(sub_calls["sub_policies"]) or "-"
            lines.append(f"{'SFT samples (one per sub-call)':<34}{sub_calls['samples']:>9}  "
                         f"(of {sub_calls['recorded']} recorded; replies by sub_policy {answered})")
    for reason, n in rl.get("dropped", {}).items():
        lines.append(f"{'RL task: ' + reason:<34}{n:>9}")
    lines.append("")
    if not rl_only:
        sub_calls = (report.get("sub_calls") or {}).get("sft") or {}
        lines.append(f"SFT train {_split_counts(sft['train'], sub_calls.get('train', 0))}, validation "
                     f"{_split_counts(sft['validation'], sub_calls.get('validation', 0))} -> "
                     f"{report['outputs']['sft']}")
    lines.append(f"RL prompts train {rl['train']}, validation {rl['validation']} -> {report['outputs']['rl']}"
                 + ("" if rl["task_files"] else "  (no task file found: pass --tasks to build the RL set)"))
    if rl.get("sft_tasks"):
        lines.append(f"RL prompts share no task with SFT's {rl['sft_tasks']} tasks ({', '.join(rl['sft_data'])})")
    if rl.get("from_train_split"):
        lines.append(f"note: {rl['from_train_split']} RL tasks come from the train corpus split, whose documents and "
                     "keys SFT's tasks show too; make RL tasks with `rl:` counts in the suite recipe (rl.jsonl)")
    return "\n".join(lines)


def _split_counts(split: dict[str, Any], sub_calls: int) -> str:
    kinds = f" ({split['samples'] - sub_calls} root turns, {sub_calls} sub-calls)" if sub_calls else ""
    return f"{split['samples']} samples{kinds} / {split['tasks']} tasks"


STAGE = Stage(name="filter", config=FilterConfig, add_arguments=add_arguments, config_from_args=config_from_args,
              plan=plan, main=main, slurm_template="stage.sbatch")
