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
from rlm_train.rlm.commands import add_client_arguments, client_flags
from rlm_train.stage import Output, add_stage_arguments, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, recipe_required=False, config_name="EvalConfig")
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


def config_from_args(args: argparse.Namespace):
    from rlm_train.eval.config import EvalConfig

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


def main(args: argparse.Namespace) -> int:
    from rlm_train.eval.config import method_rlm
    from rlm_train.eval.run import EVAL_MANIFEST, RUNS, check_config, check_overlap, missing_paths, run_eval

    config = config_from_args(args)
    check_config(config)  # run_eval's own first checks, so a dry run fails where a real run would
    assert config.out is not None
    out = Path(config.out)
    notes = [f"{config.out}: {'has an eval; this resumes it' if (out / EVAL_MANIFEST).is_file() else 'new eval'}"
             f"{' (report only: nothing runs)' if args.report_only else ''}"]
    for m in config.methods:
        rlm = method_rlm(config.rlm, m)
        mode = f"direct, context cut to {m.max_context_chars:,} chars" if m.direct else \
            f"rlm, {rlm.max_iterations} turns, depth {rlm.max_depth}"
        notes.append(f"method {m.name}: {m.policy}{' / sub ' + m.sub_policy if m.sub_policy else ''} ({mode}) "
                     f"-> {out / RUNS / m.name}")
    missing = missing_paths(config)
    if args.dry_run:
        notes += [f"{problem} (a real run stops here)" for problem in missing]
        if config.train_tasks and not any(p.startswith(("tasks ", "train_tasks ")) for p in missing):
            overlap = check_overlap(config)
            if overlap is not None:
                shared = ", ".join(f"{n} {k}" for k, n in overlap["shared"].items())
                notes.append(f"overlap with the training set: {overlap['tasks']} task(s) share {shared}"
                             if shared else "overlap with the training set: none")
    inputs = {"tasks": config.tasks, "train_tasks": config.train_tasks}
    outputs = [Output("eval_dir", config.out, "dir", "--out" if args.out else "out"),
               Output("report", str(out / "report.json"), "file", "--out" if args.out else "out")]
    if prepare("eval", args, config, inputs=inputs, outputs=outputs, notes=notes):
        return 0
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
