"""The skeleton every stage command shares: the same flags, the same plan, the same output checks.

    def add_arguments(parser):
        add_stage_arguments(parser, recipe_required=False, config_name="GenerateConfig")
        parser.add_argument("--out", ...)

    def main(args):
        config = load_config(GenerateConfig, args.recipe, args.overrides, flags=...)
        if prepare("generate", args, config, inputs={"tasks": config.tasks},
                   outputs=[Output("run_dir", config.out, "dir", "--out")]):
            return 0  # --dry-run: checked and planned, nothing loaded or written
        ...

`prepare` checks every output path before any work (a file path that is a directory, a
directory path that is a file, a parent that cannot be created or written: one-line
UserErrors naming the flag and the path), then prints the plan when `--dry-run` asks for
it. Every stage prints the same plan: one header line, then YAML (`inputs`, `outputs`,
optional `notes`, `config`), so `yaml.safe_load(plan.split("\\n", 1)[1])` reads it back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rlm_train.errors import UserError

Kind = Literal["file", "dir"]


def add_stage_arguments(parser: argparse.ArgumentParser, *, recipe_required: bool, config_name: str) -> None:
    """`--recipe/--config FILE`, `--dry-run` and positional `KEY=VALUE` overrides, spelled
    and explained the same way in every stage command. `config_name` names the config
    class the recipe's keys belong to (e.g. "SFTConfig")."""
    parser.add_argument(
        "--recipe", "--config", dest="recipe", required=recipe_required, metavar="FILE",
        help=f"YAML recipe of {config_name} keys (see recipes/; its first line is the command that runs it)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check the config and the output paths, print the plan, and exit without loading or writing anything",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted config overrides applied last (after the recipe and the flags), e.g. training.max_steps=10",
    )


# ---------------------------------------------------------------------------
# Output paths


class Output(NamedTuple):
    """One thing a stage writes: `name` in the plan, the path, whether it is a file or a
    directory, and the flag (or config key) that sets it, for error messages."""

    name: str
    path: str
    kind: Kind
    flag: str


def _label(flag: str, path: str | os.PathLike[str]) -> str:
    return f"{flag} {path}" if flag.startswith("-") else f"{flag}={path}"


def check_output(path: str | os.PathLike[str] | None, kind: Kind, flag: str) -> None:
    """Raise a one-line UserError naming `flag` and `path` if the stage could not write
    `path` as a `kind` ("file" or "dir"). Checks only; creates nothing. Run it before any
    work, so no result is computed and then lost to a bad path.

    `flag` is the option (`--out`) or config key (`output_dir`) the path came from."""
    if path is None or str(path) == "":
        raise UserError(f"{flag}: no path given; pass a {'file' if kind == 'file' else 'directory'} path")
    label = _label(flag, path)
    p = Path(path).expanduser()
    if kind == "file":
        if p.is_dir():
            raise UserError(f"{label}: is a directory; pass a file path (e.g. a new file inside it)")
        if p.exists() and not p.is_file():
            raise UserError(f"{label}: exists and is not a regular file; pass the path of a file to write")
        parent = p.parent
    else:
        if p.exists() and not p.is_dir():
            raise UserError(f"{label}: is a file; pass a directory path (it is created if missing)")
        parent = p
    # The nearest existing ancestor must be a directory this process may create entries in.
    ancestor = parent
    while not ancestor.exists() and not ancestor.is_symlink():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{label}: {ancestor} is not a directory, so nothing can be created under it; "
                        "pass a path under a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{label}: cannot write in {ancestor} (permission denied); pass a path you can write to")


# ---------------------------------------------------------------------------
# The plan


def describe_source(recipe: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> str:
    """Where a config came from, for the plan header: `recipe: R`, `command line`, plus overrides."""
    source = f"recipe: {recipe}" if recipe else "command line"
    return f"{source}; overrides: {' '.join(overrides)}" if overrides else source


def _plain(config: Any) -> Any:
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


def format_plan(
    stage: str,
    config: Any,
    source: str,
    inputs: Mapping[str, str | Sequence[str] | None],
    outputs: Mapping[str, str | None],
    notes: Sequence[str] = (),
) -> str:
    """The plan every stage prints: a header line, then YAML with `inputs:` and `outputs:`
    (name: path), `notes:` (a literal block, only when there are notes) and `config:` (the
    resolved config, every key, in declaration order)."""
    import yaml

    def dump(data: Any) -> str:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10_000)

    shown_inputs = {k: (list(v) if not isinstance(v, str) else v) for k, v in inputs.items() if v}
    shown_outputs = {k: v for k, v in outputs.items() if v}
    parts = [f"rlm-train {stage} plan ({source})", dump({"inputs": shown_inputs}).rstrip(),
             dump({"outputs": shown_outputs}).rstrip()]
    lines = [line.strip() for note in notes for line in str(note).splitlines() if line.strip()]
    if lines:
        parts.append("notes: |\n" + "\n".join(f"  {line}" for line in lines))
    parts.append(dump({"config": _plain(config)}).rstrip())
    return "\n".join(parts)


def prepare(
    stage: str,
    args: argparse.Namespace,
    config: Any,
    *,
    inputs: Mapping[str, str | Sequence[str] | None],
    outputs: Sequence[Output],
    notes: Sequence[str] = (),
    show_plan: bool = False,
) -> bool:
    """Check every output path, print the plan on `--dry-run` (or always, with `show_plan`),
    and return True when the command should stop here (`--dry-run`)."""
    for out in outputs:
        check_output(out.path, out.kind, out.flag)
    dry_run = bool(getattr(args, "dry_run", False))
    if dry_run or show_plan:
        source = describe_source(getattr(args, "recipe", None), getattr(args, "overrides", ()))
        shown = {out.name: (f"{out.path}/" if out.kind == "dir" and not str(out.path).endswith("/") else str(out.path))
                 for out in outputs}
        print(format_plan(stage, config, source, inputs, shown, notes), flush=True)
    if dry_run:
        print(f"dry run: nothing loaded or written ({stage})", file=sys.stderr)
    return dry_run


def missing_inputs(inputs: Mapping[str, str | Sequence[str] | None]) -> list[str]:
    """Notes for input paths that do not exist on this machine (a real run stops at them)."""
    notes = []
    for name, value in inputs.items():
        for path in ([value] if isinstance(value, str) else list(value or ())):
            if path and not Path(path).expanduser().exists():
                notes.append(f"{name} {path}: not found on this machine (a real run stops here)")
    return notes


def plan_notes(text: str) -> list[str]:
    """The lines of a stage's own human-readable plan (train.sft.plan, train.grpo.plan)
    as notes: its header line, which names the stage and source again, dropped."""
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]
