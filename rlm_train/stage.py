"""The skeleton every stage command shares: one typed `Stage`, the same flags, the same plan,
the same output checks.

    STAGE = Stage(name="generate", config=GenerateConfig, add_arguments=add_arguments,
                  config_from_args=config_from_args, plan=plan, main=main, slurm_template="generate.sbatch")

    def main(args):
        config = config_from_args(args)
        if prepare("generate", args, config, plan(config)):
            return 0  # --dry-run / --plan-json: checked and planned, nothing loaded or written
        ...

`plan(config) -> Plan` says what the stage reads (`inputs`), writes (`outputs`) and typed `notes`
(a `NoteKind` each), with no side effects and no heavy imports: `rlm-train pipeline` and
`rlm-train launch` call it on the typed config of each stage (rlm_train/registry.py lists them).
`prepare` checks every output path before any work (one-line UserErrors naming the flag and the
path), then prints the plan: for people on `--dry-run` (a header line, then YAML), or as JSON on
`--plan-json`, which is what a process that plans a stage in isolation reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rlm_train.errors import UserError

Kind = Literal["file", "dir"]


def add_stage_arguments(parser: argparse.ArgumentParser, *, recipe_required: bool, config_name: str,
                        example: str) -> None:
    """`--recipe/--config FILE`, `--dry-run`, `--plan-json` and positional `KEY=VALUE` overrides,
    spelled and explained the same way in every stage command. `config_name` names the config
    class the recipe's keys belong to (e.g. "SFTConfig"); `example` is one real override of it
    (tests/test_stage_registry.py checks the key)."""
    parser.add_argument(
        "--recipe", "--config", dest="recipe", required=recipe_required, metavar="FILE",
        help=f"YAML recipe of {config_name} keys (see recipes/; its first line is the command that runs it)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check the config and the output paths, print the plan, and exit without loading or writing anything",
    )
    parser.add_argument(
        "--plan-json", action="store_true",
        help="as --dry-run, but print the plan as one JSON object (inputs, outputs, notes) for programs",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help=f"dotted config overrides applied last (after the recipe and the flags), e.g. {example}; "
             "`rlm-train config COMMAND` lists every key",
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


class NoteKind(str, Enum):
    """What a plan note is about; programs decide on the kind, never on the words."""

    MISSING_INPUT = "missing_input"  # an input path not on this machine (`path` names it)
    RESUME = "resume"                # the stage would continue an earlier run in its output
    WARNING = "warning"              # the run goes ahead, but probably not as meant
    INFO = "info"                    # anything else worth showing


@dataclass(frozen=True)
class Note:
    kind: NoteKind
    text: str
    paths: tuple[str, ...] = ()  # the inputs a MISSING_INPUT note is about


@dataclass
class Plan:
    """What a stage would read and write, from its typed config alone (no side effects)."""

    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    outputs: list[Output] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    @property
    def output_paths(self) -> list[str]:
        return [str(out.path) for out in self.outputs if out.path]

    def shown_outputs(self) -> dict[str, str]:
        """name -> path, directories with a trailing `/`."""
        return {out.name: (f"{out.path}/" if out.kind == "dir" and not str(out.path).endswith("/") else str(out.path))
                for out in self.outputs if out.path}

    def relabel(self, flags: Mapping[str, str]) -> Plan:
        """The outputs whose flag is a key of `flags` named by its value instead (a config key set
        by a command-line flag: `out` -> `--out`), for the messages of the output checks."""
        return dataclasses.replace(self, outputs=[out._replace(flag=flags.get(out.flag, out.flag)) for out in self.outputs])

    def to_json(self) -> str:
        return json.dumps({"inputs": self.inputs, "outputs": [out._asdict() for out in self.outputs],
                           "notes": [{"kind": n.kind.value, "text": n.text, "paths": list(n.paths)} for n in self.notes]})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan `--plan-json` printed; ValueError when the text is not one."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls(inputs=dict(data.get("inputs") or {}),
                   outputs=[Output(o["name"], o["path"], o["kind"], o["flag"]) for o in data.get("outputs") or []],
                   notes=[Note(NoteKind(n["kind"]), n["text"], tuple(n.get("paths") or ())) for n in data.get("notes") or []])


def info(*texts: str) -> list[Note]:
    return [Note(NoteKind.INFO, text) for text in texts if text]


def warning(text: str) -> Note:
    """A WARNING note; its text starts with `warning: ` for the people who read plans."""
    return Note(NoteKind.WARNING, f"warning: {text}")


def missing_inputs(inputs: Mapping[str, str | Sequence[str] | None]) -> list[Note]:
    """Notes for input paths that do not exist on this machine (a real run stops at them)."""
    notes = []
    for name, value in inputs.items():
        for path in ([value] if isinstance(value, str) else list(value or ())):
            if path and not Path(path).expanduser().exists():
                notes.append(Note(NoteKind.MISSING_INPUT, f"{name} {path}: not found on this machine (a real run stops here)",
                                  (str(path),)))
    return notes


def plan_notes(text: str) -> list[Note]:
    """The lines of a stage's own human-readable plan (train.sft.plan, train.grpo.plan)
    as info notes: its header line, which names the stage and source again, dropped."""
    return info(*(line.strip() for line in text.splitlines()[1:] if line.strip()))


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
    notes: Sequence[str | Note] = (),
) -> str:
    """The plan for people: a header line, then YAML with `inputs:` and `outputs:` (name: path),
    `notes:` (a literal block, only when there are notes) and `config:` (the resolved config,
    every key, in declaration order)."""
    import yaml

    def dump(data: Any) -> str:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10_000)

    shown_inputs = {k: (list(v) if not isinstance(v, str) else v) for k, v in inputs.items() if v}
    shown_outputs = {k: v for k, v in outputs.items() if v}
    parts = [f"rlm-train {stage} plan ({source})", dump({"inputs": shown_inputs}).rstrip(),
             dump({"outputs": shown_outputs}).rstrip()]
    texts = [note.text if isinstance(note, Note) else str(note) for note in notes]
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    if lines:
        parts.append("notes: |\n" + "\n".join(f"  {line}" for line in lines))
    parts.append(dump({"config": _plain(config)}).rstrip())
    return "\n".join(parts)


def prepare(stage: str, args: argparse.Namespace, config: Any, plan: Plan, *, show_plan: bool = False) -> bool:
    """Check every output path, print the plan on `--dry-run` (or always, with `show_plan`) or as
    JSON on `--plan-json`, and return True when the command should stop here."""
    for out in plan.outputs:
        check_output(out.path, out.kind, out.flag)
    if getattr(args, "plan_json", False):
        print(plan.to_json(), flush=True)
        return True
    dry_run = bool(getattr(args, "dry_run", False))
    if dry_run or show_plan:
        source = describe_source(getattr(args, "recipe", None), getattr(args, "overrides", ()))
        print(format_plan(stage, config, source, plan.inputs, plan.shown_outputs(), plan.notes), flush=True)
    if dry_run:
        print(f"dry run: nothing loaded or written ({stage})", file=sys.stderr)
    return dry_run


# ---------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, as the CLI, `rlm-train pipeline` and `rlm-train launch` all know it.
    It runs as the command a user would type (`rlm-train NAME --recipe FILE`), in its own process;
    the others plan it from its typed config."""

    name: str
    """The command that runs it (`generate`; `tasks make`), and a pipeline stage's `run:`."""
    config: type[Any]
    """Its config class (a config.StrictModel): a pipeline stage's `with:` is parsed into it."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Its command-line flags."""
    config_from_args: Callable[[argparse.Namespace], Any]
    """The typed config from the parsed command line (recipe < flags < KEY=VALUE)."""
    plan: Callable[[Any], Plan]
    """What it reads and writes, from its config; no side effects, no heavy imports."""
    main: Callable[[argparse.Namespace], int | None]
    """The command: config_from_args, plan, prepare, then the run."""
    slurm_template: str
    """Its sbatch template, a file in slurm/ (`stage.sbatch` runs any command on one node)."""

    @property
    def module(self) -> str:
        """The module that defines the stage: the root of the code it depends on."""
        return str(self.main.__module__)

    @property
    def argv(self) -> list[str]:
        return self.name.split()
