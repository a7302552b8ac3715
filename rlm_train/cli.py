"""`rlm-train <command>`: one entry point, thin.

Each command lives in its stage's `commands` module, which exposes
`add_arguments(parser)` and `main(args) -> int | None`. The module is imported
only when its command runs, so `rlm-train --help` stays fast (no torch).
Stage commands share their flags, plan and output checks through `rlm_train.stage`.

Errors: a UserError (or an OSError naming a file) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType
from typing import Callable

from rlm_train import __version__
from rlm_train.errors import UserError

# Each command module is imported only when its command runs (plain imports, so tools see them).


def _run() -> ModuleType:
    from rlm_train.rlm import commands

    return commands


def _tasks() -> ModuleType:
    from rlm_train.tasks import commands

    return commands


def _generate() -> ModuleType:
    from rlm_train.rollouts import commands

    return commands


def _filter() -> ModuleType:
    from rlm_train.rollouts import filter_commands

    return filter_commands


def _sft() -> ModuleType:
    from rlm_train.train import sft_commands

    return sft_commands


def _grpo() -> ModuleType:
    from rlm_train.train import grpo_commands

    return grpo_commands


def _eval() -> ModuleType:
    from rlm_train.eval import commands

    return commands


def _view() -> ModuleType:
    from rlm_train.viewer import commands

    return commands


def _serve() -> ModuleType:
    from rlm_train.serve import commands

    return commands


def _pipeline() -> ModuleType:
    from rlm_train.pipeline import commands

    return commands


def _launch() -> ModuleType:
    from rlm_train.launch import commands

    return commands


def _bench() -> ModuleType:
    from rlm_train import bench

    return bench


# name -> (loader of its module, one-line help)
COMMANDS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "run": (_run, "run one RLM episode on a context file and print the answer"),
    "tasks": (_tasks, "make, show and score long-context task sets"),
    "generate": (_generate, "generate RLM trajectories concurrently (resumable)"),
    "filter": (_filter, "filter trajectories into SFT and RL datasets"),
    "sft": (_sft, "supervised fine-tuning (TRL + PEFT) on per-turn samples"),
    "grpo": (_grpo, "GRPO with full RLM episodes in the sandbox as rollouts"),
    "eval": (_eval, "evaluate methods on held-out tasks: report with CIs, paired diffs, plots"),
    "view": (_view, "trajectories as one self-contained HTML page (filters, timelines, sub-call trees)"),
    "serve": (_serve, "serve a model on vLLM (with LoRA adapters) and/or the RLM gateway"),
    "pipeline": (_pipeline, "run a pipeline recipe's stages in order, skipping finished ones (resumable)"),
    "launch": (_launch, "submit a pipeline (or one stage recipe) as dependent Slurm jobs; --status shows them"),
    "bench": (_bench, "benchmarks reported as ratios against a baseline in the same run"),
}


def _top_level_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: rlm-train <command> [options]",
        "",
        "Train small open models to be Recursive Language Models.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `rlm-train <command> --help` for a command's options."]
    return "\n".join(lines)


def _describe_os_error(exc: OSError) -> str:
    """`<filename>: <strerror>` on one line (both files for a failed rename/link)."""
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}".replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    if argv[0] == "--version":
        print(f"rlm-train {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlm-train: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    load, help_ = COMMANDS[name]
    try:
        module = load()
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("rlm_train"):
            raise
        print(f"rlm-train: error: {name} needs the package {exc.name!r}; install it (make install)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"rlm-train {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.main(args)
    except UserError as exc:
        print(f"rlm-train {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlm-train {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. `rlm-train ... --dry-run | head`
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return 141
    except OSError as exc:
        # A backstop: stage commands check their output paths before any work (rlm_train.stage),
        # so this catches what a check cannot foresee (disk full, a path removed mid-run). Only
        # errors that name a file; others (connection errors, bugs) keep their traceback.
        if exc.filename is None:
            raise
        print(f"rlm-train {name}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
