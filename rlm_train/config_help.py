"""Every key of a config class, for people: `rlm-train config STAGE` and the epilog of `STAGE --help`.

    print(format_config_keys(GenerateConfig, "generate"))

Read from the same pydantic fields the validator checks (types, bounds, defaults, the
attribute docstrings), so the listing cannot drift from what a recipe may say. Nested
sections are flattened to dotted keys (`rlm.max_iterations`); a list of sections shows its
items' keys as `methods[].name`, a mapping of them as `families.NAME.train`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import shutil
import textwrap
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlm_train.config import aliases_of, container_of, section_type


@dataclass(frozen=True)
class ConfigKey:
    """One settable key: its dotted name, type (with bounds) and default as text, the first
    paragraph of its docstring, and the other names it is accepted under."""

    key: str
    type: str
    default: str
    doc: str
    aliases: tuple[str, ...] = ()
    section: str = ""  # the dotted section it is in ("" at the top level)


@dataclass(frozen=True)
class _Section:
    prefix: str  # "" or "rlm" or "methods[]"
    doc: str


_NO_DEFAULT = object()


def config_keys(cls: type) -> list[ConfigKey]:
    """Every leaf key of `cls` and its sections, in declaration order."""
    keys: list[ConfigKey] = []
    _collect(cls, "", _default_instance(cls), keys, [], _aliases_by_key(cls))
    return keys


def _aliases_by_key(cls: type) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for alias, target in aliases_of(cls).items():
        by_key.setdefault(target, []).append(alias)
    return by_key


def _collect(cls: type, prefix: str, instance: Any, keys: list[ConfigKey], sections: list[_Section],
             aliases: dict[str, list[str]]) -> None:
    for name, annotation, default, doc, metadata in _fields(cls):
        if instance is not None and hasattr(instance, name):
            default = getattr(instance, name)
        model = section_type(annotation)
        if model is not None:
            kind = container_of(annotation)
            below = prefix + name + {"one": "", "list": "[]", "dict": ".NAME"}[kind]
            sub_instance = default if kind == "one" and isinstance(default, model) else None
            if kind == "one" and sub_instance is None:
                sub_instance = _default_instance(model)
            sections.append(_Section(below, _first_paragraph(doc)))
            _collect(model, below + ".", sub_instance, keys, sections, aliases)
            continue
        key = prefix + name
        keys.append(ConfigKey(key, type_text(annotation, metadata), default_text(default), _first_paragraph(doc),
                              tuple(aliases.get(key, ())), prefix.rstrip(".")))


def _sections(cls: type) -> list[_Section]:
    sections: list[_Section] = [_Section("", _first_paragraph(cls.__doc__ or ""))]
    _collect(cls, "", _default_instance(cls), [], sections, {})
    return sections


def _fields(cls: type) -> list[tuple[str, Any, Any, str, list[Any]]]:
    """(name, annotation, default, doc, constraints) of a config class or a config dataclass."""
    if issubclass(cls, BaseModel):
        out = []
        for name, info in cls.model_fields.items():
            default: Any = info.default
            if default is PydanticUndefined:
                default = info.default_factory() if info.default_factory is not None else _NO_DEFAULT  # type: ignore[call-arg]
            out.append((name, info.annotation, default, info.description or "", list(info.metadata)))
        return out
    section: Any = cls  # a dataclass section (SandboxConfig)
    hints = typing.get_type_hints(section)
    docs = _attribute_docstrings(section)
    out = []
    for f in dataclasses.fields(section):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO_DEFAULT
        out.append((f.name, hints[f.name], default, docs.get(f.name, ""), []))
    return out


@lru_cache(maxsize=None)
def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The string under each annotated attribute of a class body (pydantic reads these for
    models; dataclass sections such as SandboxConfig need the same by hand)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default_instance(cls: type) -> Any:
    """The class built from its defaults (None when it has required keys)."""
    try:
        return cls()
    except Exception:  # required fields: defaults come from the fields one by one
        return None


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


# ---------------------------------------------------------------------------
# Types, bounds and defaults as text


_CHOICES = re.compile(r"^\^\(([\w|.-]+)\)\$$")


def type_text(annotation: Any, metadata: list[Any] = ()) -> str:  # type: ignore[assignment]
    """`int (1..10000)`, `str | null`, `tensorboard | wandb`, `list[str]`, ..."""
    text = _type_name(annotation)
    bounds = _bounds(metadata)
    for item in metadata:
        pattern = getattr(item, "pattern", None)
        match = _CHOICES.match(pattern) if isinstance(pattern, str) else None
        if match:
            text = " | ".join(match.group(1).split("|"))
        elif isinstance(pattern, str):
            bounds.append(f"matching {pattern}")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args if a is not Ellipsis) + "]"
    if origin in (list, dict, set):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> list[str]:
    limits = {kind: getattr(item, kind) for item in metadata for kind in ("ge", "gt", "le", "lt")
              if getattr(item, kind, None) is not None}
    if "ge" in limits and "le" in limits:
        return [f"{limits['ge']}..{limits['le']}"]
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return [f"{signs[kind]}{value}" for kind, value in limits.items()]


def default_text(value: Any) -> str:
    if value is _NO_DEFAULT:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


# ---------------------------------------------------------------------------
# The listing


def format_config_keys(cls: type, stage: str, width: int | None = None) -> str:
    """The text `rlm-train config STAGE` prints: a short how-to, then every key by section, one
    row each (key, type with bounds, default, the first sentence of its doc), aligned per section."""
    width = width or max(100, shutil.get_terminal_size((120, 24)).columns)
    lines = [
        f"rlm-train {stage}: config keys ({cls.__name__}). Set them in a YAML recipe (--recipe FILE) or on the",
        "command line as KEY=VALUE after the flags: nested keys dotted (rlm.max_iterations=12), lists as [a,b].",
        "Each row: KEY  TYPE (bounds)  DEFAULT  what it does; 'also:' names other accepted spellings (TRL's).",
    ]
    by_section: dict[str, list[ConfigKey]] = {}
    for key in config_keys(cls):
        by_section.setdefault(key.section, []).append(key)
    for section in _sections(cls):
        members = by_section.get(section.prefix, [])
        if not members:
            continue
        heading = f"[{section.prefix or 'top level'}] {_first_sentence(section.doc)}".rstrip()
        lines += ["", textwrap.shorten(heading, width=width, placeholder=" ...")]
        columns = [min(max(len(getattr(k, field)) for k in members), cap)
                   for field, cap in (("key", 40), ("type", 26), ("default", 18))]
        for key in members:
            doc = _first_sentence(key.doc) + (f" (also: {', '.join(key.aliases)})" if key.aliases else "")
            lines += _row_lines([key.key, key.type, key.default], columns, doc, width)
    return "\n".join(lines)


def _row_lines(cells: list[str], columns: list[int], doc: str, width: int) -> list[str]:
    """One key's row: cells padded to their column (a longer cell pushes the rest of its row
    right), the doc wrapped beside them, or under them where the room beside is too narrow."""
    row = "  " + "".join(cell.ljust(column) + "  " for cell, column in zip(cells, columns))
    doc_col = 2 + sum(column + 2 for column in columns)
    room = width - max(doc_col, len(row))
    if not doc:
        return [row.rstrip()]
    if room < 40:
        return [row.rstrip(), *textwrap.wrap(doc, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)]
    wrapped = textwrap.wrap(doc, width=room, break_on_hyphens=False)
    return [row + wrapped[0], *(" " * len(row) + line for line in wrapped[1:])]


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not `e.g.`, not a decimal point)."""
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(\s+(?=[A-Z`(*])|$)", text)
    return text[: match.start() + 1] if match else text


def resolve_key(cls: type, name: str) -> str | None:
    """The dotted key a bare or dotted name stands for (`learning_rate` -> `training.learning_rate`,
    an alias -> its canonical key), or None when no key (or more than one) has that name."""
    aliases = aliases_of(cls)
    if name in aliases:
        return aliases[name]
    keys = [k.key for k in config_keys(cls)]
    if name in keys:
        return name
    last = name.rsplit(".", 1)[-1]
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    matches += [target for alias, target in aliases.items() if alias.rsplit(".", 1)[-1] == last]
    return matches[0] if len(set(matches)) == 1 else None
