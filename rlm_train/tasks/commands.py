"""`rlm-train tasks make | show | score`.

    rlm-train tasks make --family niah --n 20 --context-tokens 32000 --seed 0 --out data/tasks/niah.jsonl
    rlm-train tasks make --recipe recipes/tasks-suite.yaml [KEY=VALUE ...] [--dry-run]
    rlm-train tasks show data/tasks/niah.jsonl
    rlm-train tasks score --tasks data/tasks/niah.jsonl --predictions preds.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.stage import Output, Plan, Stage, add_stage_arguments, check_output, info, prepare
from rlm_train.tasks.suite import TaskSuiteConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{make,show,score}", required=True)

    add_make_arguments(sub.add_parser("make", help="generate a task file, or a whole suite from a recipe"))

    show = sub.add_parser("show", help="summarize a task file")
    show.add_argument("file")
    show.add_argument("--limit", type=int, default=20, help="tasks to list (default 20)")
    show.add_argument("--full", action="store_true", help="print queries whole")

    score = sub.add_parser("score", help="score a predictions file against a task file")
    score.add_argument("--tasks", required=True, help="task JSONL")
    score.add_argument("--predictions", required=True, help='JSONL lines {"id": ..., "answer": ...}')
    score.add_argument("--out", help="write per-task scores (JSONL) here")


def add_make_arguments(make: argparse.ArgumentParser) -> None:
    """`tasks make`: one family from flags, or a whole suite (TaskSuiteConfig) from a recipe."""
    make.add_argument("--family", help="niah | oolong | pairs | multihop | codeqa")
    make.add_argument("--n", type=int, help="number of tasks")
    make.add_argument("--context-tokens", type=int, help="context length in tokens (8000 .. 1000000+)")
    make.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    make.add_argument("--split", default="train", choices=["train", "rl", "heldout"],
                      help="corpus items and keys to draw from (default train; rl: GRPO's tasks, disjoint from SFT's)")
    make.add_argument("--out", help="output JSONL file")
    make.add_argument("--tokenizer", help="Hugging Face tokenizer directory to count tokens with (default: 4 chars/token)")
    make.add_argument("--inline-max-tokens", type=int, default=None,
                      help="contexts this big or bigger go to files beside --out (default 256000)")
    add_stage_arguments(make, recipe_required=False, config_name="TaskSuiteConfig", example="seed=1")


def main(args: argparse.Namespace) -> int:
    return {"make": _make, "show": _show, "score": _score}[args.action](args)


def _load_tokenizer(spec: str | None) -> Any:
    if not spec:
        return None
    from rlm_train.models.loading import load_tokenizer

    return load_tokenizer(spec)


def _make(args: argparse.Namespace) -> int:
    if args.recipe:
        return _make_suite(args)
    if args.overrides:
        raise UserError(f"KEY=VALUE overrides ({args.overrides[0]!r}) need --recipe; for one family use the flags")
    missing = [flag for flag, value in (("--family", args.family), ("--n", args.n),
               ("--context-tokens", args.context_tokens), ("--out", args.out)) if value is None]
    if missing:
        raise UserError(f"tasks make needs {', '.join(missing)} (or --recipe FILE for a suite)")
    from rlm_train.tasks import corpora
    from rlm_train.tasks.generate import INLINE_MAX_TOKENS, check_count, check_length, make_tasks, write_tasks
    from rlm_train.tasks.registry import get_family

    # make_tasks' own checks, first, so a dry run fails where a real run would.
    get_family(args.family)
    check_length(args.family, args.context_tokens)
    corpora.check_split(args.split)
    check_count(args.n, args.context_tokens)
    inline_max = args.inline_max_tokens or INLINE_MAX_TOKENS
    config = {"family": args.family, "n": args.n, "context_tokens": args.context_tokens, "seed": args.seed,
              "split": args.split, "out": args.out, "tokenizer": args.tokenizer, "inline_max_tokens": inline_max}
    notes = info(f"{args.n} {args.family} tasks ({args.split}), ~{args.context_tokens:,} tokens each")
    outputs = [Output("tasks", args.out, "file", "--out")]
    if args.context_tokens >= inline_max:  # write_tasks puts contexts this big in files beside the task file
        outputs.append(Output("contexts", _contexts_dir(args.out), "dir", "--out"))
    planned = Plan(inputs={"tokenizer": args.tokenizer} if args.tokenizer else {}, outputs=outputs, notes=notes)
    if prepare("tasks make", args, config, planned):
        return 0
    tasks = make_tasks(args.family, args.n, args.context_tokens, args.seed,
                       tokenizer=_load_tokenizer(args.tokenizer), split=args.split)
    write_tasks(args.out, tasks, inline_max)
    print(f"wrote {len(tasks)} {args.family} tasks ({args.split}, ~{args.context_tokens:,} tokens each) to {args.out}")
    return 0


def _contexts_dir(task_file: str) -> str:
    path = Path(task_file)
    return str(path.parent / f"{path.stem}.contexts")


def config_from_args(args: argparse.Namespace) -> TaskSuiteConfig:
    from rlm_train.config import load_config

    if args.family or args.n or args.context_tokens or args.out:
        raise UserError("--recipe builds a whole suite; set families/context_tokens/out_dir in the recipe, not flags")
    return load_config(TaskSuiteConfig, args.recipe, args.overrides)


def plan(config: TaskSuiteConfig) -> Plan:
    from rlm_train.tasks.suite import plan as batches_of
    from rlm_train.tasks.suite import suite_splits

    batches = batches_of(config)
    total = sum(n for *_, n in batches)
    out = Path(config.out_dir)
    notes = info(f"{total} tasks in {len(batches)} batches",
                 *(f"{split:8s} {family:9s} {tokens:>9,} tokens x {n}" for split, family, tokens, n in batches))
    outputs = [Output("suite", config.out_dir, "dir", "out_dir"),
               *(Output(name, str(out / f"{name}.{ext}"), "file", "out_dir")
                 for name, ext in [*((split, "jsonl") for split in suite_splits(config)), ("manifest", "json")])]
    return Plan(inputs={"tokenizer": config.tokenizer} if config.tokenizer else {}, outputs=outputs, notes=notes)


def _make_suite(args: argparse.Namespace) -> int:
    from rlm_train.tasks.suite import build_suite

    config = config_from_args(args)
    planned = plan(config)
    if prepare("tasks make", args, config, planned):
        return 0
    print(f"suite {args.recipe}: {planned.notes[0].text} -> {config.out_dir}")
    manifest = build_suite(config, tokenizer=_load_tokenizer(config.tokenizer))
    written = ", ".join(f"{split}.jsonl" for split in manifest["files"])
    print(f"wrote {config.out_dir}/{written}, manifest.json: {json.dumps(manifest['counts'])}")
    return 0


def _show(args: argparse.Namespace) -> int:
    if Path(args.file).is_dir():
        files = _task_files_in(Path(args.file))
        for i, path in enumerate(files):
            print(f"{'' if i == 0 else chr(10)}== {path}")
            _show_file(path, args)
        return 0
    return _show_file(Path(args.file), args)


def _task_files_in(directory: Path) -> list[Path]:
    """The task files a directory stands for: a generate run's (its manifest names it), an
    eval's, or the task JSONL files in it (a suite: train.jsonl, heldout.jsonl)."""
    for manifest_name, key in (("manifest.json", "tasks_file"), ("eval.json", "tasks")):
        manifest = directory / manifest_name
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except ValueError:
                raise UserError(f"{manifest}: not valid JSON; pass a task JSONL file instead") from None
            named = data.get(key)
            names = [named] if isinstance(named, str) else [t.get("file") for t in named or [] if isinstance(t, dict)]
            files = [Path(n) for n in names if n]
            if files:
                return files
    files = [p for p in sorted(directory.glob("*.jsonl")) if _first_line_is_task(p)]
    if not files:
        raise UserError(f"{directory}: is a directory with no task file in it; pass a task JSONL file "
                        "(`rlm-train tasks make` writes them), a suite directory, or a generate run directory")
    return files


def _first_line_is_task(path: Path) -> bool:
    from rlm_train.records import TASK_SCHEMA

    with path.open("rb") as fh:
        return f'"schema": "{TASK_SCHEMA}"'.encode() in fh.readline(1 << 20).replace(b'":"', b'": "')


def _show_file(path: Path, args: argparse.Namespace) -> int:
    from rlm_train.formats import iter_jsonl
    from rlm_train.records import check_task

    args.file = str(path)
    by_family: dict[str, int] = defaultdict(int)
    tokens: list[int] = []
    shown = 0
    for _, task in iter_jsonl(args.file, check=check_task, fix="is this a rlm-train/task/v1 file? (`rlm-train tasks make` writes them)"):
        by_family[task["family"]] += 1
        meta = task.get("meta", {})
        tokens.append(int(meta.get("context_tokens", 0)))
        if shown < args.limit:
            shown += 1
            query = task["query"] if args.full else _last_line(task["query"])[:160]
            where = "inline" if "context" in task else f"file {task['context_path']}"
            size = f"{meta['context_tokens']:,}" if isinstance(meta.get("context_tokens"), int) else "?"
            print(f"{task['id']}  [{task['family']}, {size} tokens, {where}]")
            print(f"  query:  {query}")
            print(f"  answer: {json.dumps(task['answer'], ensure_ascii=False)[:160]}  (scorer {task['scorer']})")
    count = sum(by_family.values())
    if not count:
        raise UserError(f"{args.file}: no tasks in the file")
    families = ", ".join(f"{f}: {n}" for f, n in sorted(by_family.items()))
    print(f"{count} tasks ({families}); context tokens min {min(tokens):,}, max {max(tokens):,}")
    return 0


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    question = [line for line in lines if line.startswith("Question:")]
    return (question[0] if question else lines[-1] if lines else "").strip()


def _score(args: argparse.Namespace) -> int:
    from rlm_train.formats import write_jsonl_atomic
    from rlm_train.tasks.scorefile import score_files

    if args.out:
        check_output(args.out, "file", "--out")
    rows, summary = score_files(args.tasks, args.predictions)
    for family, (n, mean) in sorted(summary["families"].items()):
        print(f"{family:9s} n={n:<5d} mean score {mean:.4f}")
    print(f"{'all':9s} n={summary['n']:<5d} mean score {summary['mean']:.4f}")
    if args.out:
        write_jsonl_atomic(args.out, rows)
        print(f"per-task scores written to {args.out}")
    return 0


STAGE = Stage(name="tasks make", config=TaskSuiteConfig, add_arguments=add_make_arguments,
              config_from_args=config_from_args, plan=plan, main=_make, slurm_template="stage.sbatch")
