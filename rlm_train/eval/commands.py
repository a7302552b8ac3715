"""`rlm-train eval`: several methods over held-out task sets, one report.

    rlm-train eval --recipe recipes/eval-scripted-cpu.yaml
    rlm-train eval --tasks data/tasks/suite/heldout.jsonl --out runs/eval \\
        --method base=openai:Qwen/Qwen3-8B --method tuned=openai:rlm-qwen3-8b --base-url http://127.0.0.1:8000/v1
    rlm-train eval --recipe R --report-only        # rebuild report.json/.md and the plots from the runs

Priority: recipe < command-line flags < KEY=VALUE overrides. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.eval.config import EvalConfig
from rlm_train.rlm.commands import add_client_arguments, client_flags
from rlm_train.stage import Note, NoteKind, Output, Plan, Stage, add_stage_arguments, info, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=False, config_name="EvalConfig", example="samples=3")
    parser.add_argument("--tasks", action="append", default=[],
                        help="held-out task file (repeatable; replaces the recipe's list)")
    parser.add_argument("--out", help="eval directory; re-running the same command there resumes")
    parser.add_argument("--method", action="append", default=[], metavar="NAME=SPEC",
                        help="an RLM method, e.g. base=openai:Qwen/Qwen3-8B or tuned=hf:runs/sft/merged "
                             "(repeatable; replaces the recipe's methods; direct methods need a recipe)")
    parser.add_argument("--base-url", action="append", default=[],
                        help="server(s) for the --method policies (repeatable)")
    parser.add_argument("--train-tasks", action="append", default=[],
                        help="training task file to check the held-out tasks against (repeatable)")
    parser.add_argument("--samples", type=int, help="episodes per (method, task) (default 1)")
    parser.add_argument("--concurrency", type=int, help="episodes in flight at once (default 32)")
    add_client_arguments(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the report from what the run directories hold")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")


def _methods(specs: list[str], base_urls: list[str]) -> list[dict] | None:
    if not specs:
        return None
    methods = []
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise UserError(f"--method {item!r}: expected NAME=SPEC, e.g. --method base=openai:Qwen/Qwen3-8B")
        methods.append({"name": name.strip(), "policy": spec.strip(), "base_urls": list(base_urls)})
    return methods


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    if args.base_url and not args.method:
        raise UserError("--base-url goes with --method; in a recipe, set each method's base_urls")
    flags = {
        "tasks": args.tasks or None,
        "out": args.out,
        "methods": _methods(args.method, args.base_url),
        "train_tasks": args.train_tasks or None,
        "samples": args.samples,
        "concurrency": args.concurrency,
        **client_flags(args),
        "progress": args.progress,
    }
    return load_config(EvalConfig, args.recipe, args.overrides, flags=flags)


def plan(config: EvalConfig) -> Plan:
    from rlm_train.eval.config import method_rlm
    from rlm_train.eval.run import EVAL_MANIFEST, RUNS, check_config
    from rlm_train.rollouts.tracking import describe_tracking

    check_config(config)  # run_eval's own first checks, so a dry run fails where a real run would
    assert config.out is not None
    out = Path(config.out)
    resuming = (out / EVAL_MANIFEST).is_file()
    notes = [Note(NoteKind.RESUME if resuming else NoteKind.INFO,
                  f"{config.out}: {'has an eval; this resumes it' if resuming else 'new eval'}")]
    for m in config.methods:
        rlm = method_rlm(config.rlm, m)
        mode = f"direct, context cut to {m.max_context_chars:,} chars" if m.direct else \
            f"rlm, {rlm.max_iterations} turns, depth {rlm.max_depth}{', one-shot from ' + m.one_shot if m.one_shot else ''}"
        notes += info(f"method {m.name}: {m.policy}{' / sub ' + m.sub_policy if m.sub_policy else ''} ({mode}) "
                      f"-> {out / RUNS / m.name}")
    notes += missing_notes(config)
    notes += info(describe_tracking(config, config.out))
    inputs = {"tasks": config.tasks, "train_tasks": config.train_tasks}
    outputs = [Output("eval_dir", config.out, "dir", "out"), Output("report", str(out / "report.json"), "file", "out")]
    return Plan(inputs={k: v for k, v in inputs.items() if v}, outputs=outputs, notes=notes)


def missing_notes(config: EvalConfig) -> list[Note]:
    """eval.run.missing_paths as typed notes, each with the input paths it is about: per task file,
    then per method (the model and adapter paths of its hf: policies)."""
    from rlm_train.eval.run import missing_paths
    from rlm_train.policies.spec import parse_policy_spec

    notes = []
    for key in ("tasks", "train_tasks"):
        for file in getattr(config, key):
            alone = config.model_copy(update={"tasks": [], "train_tasks": [], "methods": [], key: [file]})
            notes += [Note(NoteKind.MISSING_INPUT, f"{problem} (a real run stops here)", (file,))
                      for problem in missing_paths(alone)]
    for method in config.methods:
        alone = config.model_copy(update={"tasks": [], "train_tasks": [], "methods": [method]})
        specs = [parse_policy_spec(spec) for spec in (method.policy, method.sub_policy) if spec]
        paths = tuple(str(p) for kind, args in specs if kind == "hf" for p in (args["path"], args.get("adapter")) if p)
        notes += [Note(NoteKind.MISSING_INPUT, f"{problem} (a real run stops here)", paths)
                  for problem in missing_paths(alone)]
    return notes


def overlap_note(config: EvalConfig) -> list[Note]:
    """How the held-out tasks overlap the training set (reads both task sets): the command's own
    dry run shows it."""
    from rlm_train.eval.run import check_overlap

    overlap = check_overlap(config)
    if overlap is None:
        return []
    shared = ", ".join(f"{n} {k}" for k, n in overlap["shared"].items())
    return info(f"overlap with the training set: {overlap['tasks']} task(s) share {shared}"
                if shared else "overlap with the training set: none")


def main(args: argparse.Namespace) -> int:
    from rlm_train.eval.run import RUNS, run_eval

    config = config_from_args(args)
    planned = plan(config).relabel({"out": "--out"} if args.out else {})
    if args.report_only:
        planned.notes.insert(1, Note(NoteKind.INFO, "report only: nothing runs"))
    task_files = {*config.tasks, *config.train_tasks}
    if args.dry_run and config.train_tasks and not any(note.kind == NoteKind.MISSING_INPUT and task_files & set(note.paths)
                                                       for note in planned.notes):
        planned.notes += overlap_note(config)
    if prepare("eval", args, config, planned):
        return 0
    assert config.out is not None
    out = Path(config.out)
    from rlm_train.rollouts.progress import Stopped

    try:
        report = run_eval(config, report_only=args.report_only)
    except Stopped as stopped:  # SIGINT or SIGTERM: finished episodes are saved
        print(f"rlm-train eval: {stopped.message}; the report is written once every method has run",
              file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"stopped; finished episodes are saved under {out / RUNS}. Re-run the same command to resume.",
              file=sys.stderr)
        raise
    from rlm_train.eval.report import render_markdown

    print(render_markdown(report), end="")
    print(f"\nwrote {out / 'report.json'}, {out / 'report.md'}"
          f"{', ' + ', '.join(str(out / p) for p in report['plots']) if report['plots'] else ' (no plots: matplotlib is not installed)'}")
    return 0


STAGE = Stage(name="eval", config=EvalConfig, add_arguments=add_arguments, config_from_args=config_from_args, plan=plan,
              main=main, slurm_template="eval.sbatch")
