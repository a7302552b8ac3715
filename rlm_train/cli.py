"""`rlm-train <command>`: one entry point, thin.

Each command lives in its own module, which exposes `add_arguments(parser)` and
`main(args) -> int | None`; rlm_train/registry.py lists them (a stage's module also defines its
`STAGE`). The module is imported only when its command runs, so `rlm-train --help` stays fast
(no torch). Stage commands share their flags, plan and output checks through `rlm_train.stage`.

Errors: a UserError (or an OSError naming a file) is one line on stderr and exit 2; so is an
unknown flag, with the `KEY=VALUE` override it may have meant.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rlm_train import __version__, registry
from rlm_train.errors import UserError


def _top_level_help() -> str:
    found = registry.commands()
    width = max(len(c.name) for c in found)
    lines = [
        "usage: rlm-train <command> [options]",
        "",
        "Train small open models to be Recursive Language Models.",
        "",
        "commands:",
    ]
    lines += [f"  {c.name.ljust(width)}  {c.help}" for c in found]
    lines += ["", "Run `rlm-train <command> --help` for a command's options, `rlm-train config <command>` for its config keys."]
    return "\n".join(lines)


def build_parser(name: str, module: Any, help_: str) -> argparse.ArgumentParser:
    """The command's parser; a stage's lists every config key after its flags."""
    stage = getattr(module, "STAGE", None)
    epilog = None
    if stage is not None:
        from rlm_train.config_help import format_config_keys

        epilog = format_config_keys(stage.config, stage.name)
    parser = argparse.ArgumentParser(prog=f"rlm-train {name}", description=help_, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def override_hint(command: str, unknown: list[str], argv: list[str], config: Any) -> str:
    """For a flag a stage command does not have (`--learning_rate 1e-4`): the `KEY=VALUE` override
    meant, with the dotted key when the name is one of the config's keys or aliases."""
    from rlm_train.config_help import resolve_key

    for index, token in enumerate(argv):
        if token not in unknown or not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            value = argv[index + 1]
        key = resolve_key(config, name.replace("-", "_"))
        if key is None:
            return (f"config keys are set as KEY=VALUE, e.g. {name.replace('-', '_')}={value or '...'} "
                    f"(`rlm-train config {command}` lists them)")
        return f"config keys are set as KEY=VALUE: {key}={value or '...'}"
    return ""


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `rlm-train --help | head`
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    except (OSError, ValueError):
        pass


def _describe_os_error(exc: OSError) -> str:
    """`<filename>: <strerror>` on one line (both files for a failed rename/link)."""
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}".replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print(_top_level_help())
        return 0
    if argv[0] == "--version":
        _print(f"rlm-train {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    found = registry.command(name)
    if found is None:
        names = ", ".join(c.name for c in registry.commands())
        print(f"rlm-train: error: unknown command {name!r}; choose from {names}", file=sys.stderr)
        return 2
    try:
        module = found.load()
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("rlm_train"):
            raise
        print(f"rlm-train: error: {name} needs the package {exc.name!r}; install it (make install)", file=sys.stderr)
        return 2
    try:
        parser = build_parser(name, module, found.help)
        args, unknown = parser.parse_known_args(rest)
    except BrokenPipeError:  # `rlm-train sft --help | head`
        _silence_stdout()
        return 141
    if unknown:
        stage = getattr(module, "STAGE", None)
        hint = override_hint(name, unknown, rest, stage.config) if stage is not None else ""
        print(f"rlm-train {name}: error: unrecognized arguments: {' '.join(unknown)}{'; ' + hint if hint else ''}",
              file=sys.stderr)
        return 2
    try:
        code = module.main(args)
    except UserError as exc:
        print(f"rlm-train {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlm-train {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. `rlm-train ... --dry-run | head`
        _silence_stdout()
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
