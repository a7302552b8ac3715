"""Typed configs: pydantic models loaded from YAML recipes with dotted overrides.

    cfg = load_config(SFTConfig, "recipes/tiny-cpu-sft.yaml", ["training.learning_rate=1e-4"])

Unknown keys are errors that name the key and the file, with the closest valid key when
one is close (or the key's place, when it belongs to another section or is another
library's name for one of ours); so are wrong types and values out of bounds.

Aliases: a config class may declare `config_aliases = {"num_train_epochs": "training.epochs"}`
(dotted keys relative to that class). `build_config` rewrites them, at any nesting level,
before validation; an alias and its target given together is an error.

Bounds: every number that sizes memory or time has an upper bound (`bounded(...)`), chosen
far above any real run, so that a typo (`--samples 100000000000000000000`) is refused at
once with the bound and its reason instead of exhausting the machine hours later.
`rlm-train config STAGE` lists every key with its type, bounds and default (config_help.py).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlm_train.errors import UserError


class StrictModel(BaseModel):
    """Base for every config: unknown keys are rejected, fields are documented."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    config_aliases: ClassVar[dict[str, str]] = {}
    """Other names accepted for keys of this class (alias -> canonical, both dotted, relative to it):
    the names TRL and transformers give the same setting."""


ConfigT = TypeVar("ConfigT", bound=StrictModel)

# The key of a Field's json_schema_extra that says why its upper bound is there.
BOUND_REASON = "bound_reason"


def bounded(default: Any, *, why: str, **constraints: Any) -> Any:
    """A numeric Field with bounds (ge/gt/le/lt) whose upper bound protects memory or time;
    `why` (a clause) is said with the bound when a value is over it."""
    return Field(default, json_schema_extra={BOUND_REASON: why}, **constraints)


def inherited(cls: type[BaseModel], name: str, default: Any) -> Any:
    """A subclass's Field for `cls`'s field `name` with another default: its bounds and their
    reason stay those of `cls` (a redeclared pydantic field keeps nothing of the parent's)."""
    info = cls.model_fields[name]
    constraints = {kind: getattr(item, kind) for item in info.metadata for kind in ("ge", "gt", "le", "lt")
                   if getattr(item, kind, None) is not None}
    return Field(default, json_schema_extra=info.json_schema_extra, **constraints)


# ---------------------------------------------------------------------------
# Recipes and overrides


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict; a missing or malformed file is a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a YAML recipe file to --recipe (e.g. recipes/*.yaml)")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(exc)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of config keys, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What YAML's parser objected to and where, on one line."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if not problem:
        return str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {override!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(exc)}); close its "
                        f"brackets or quotes (a list: {key}=[a,b]), or quote it whole to pass text: "
                        f"'{key}=\"{raw}\"'") from None
    _set_dotted(data, parts, value, f"override {override!r}")


def get_dotted(data: Any, dotted: str, default: Any = None) -> Any:
    """The value at a dotted key of nested dicts (`rollout.vllm_gpus`), or `default` where a
    section or the key is missing."""
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set_dotted(data: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------
# The fields of a config class: the one source for validation messages and `rlm-train config`


def section_type(annotation: Any) -> type | None:
    """The config class a field holds (a StrictModel or a pydantic-checked dataclass such as
    SandboxConfig): itself, or inside Optional[...], list[...] or dict[str, ...]."""
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None


def container_of(annotation: Any) -> str:
    """How a field holds its section: "one", "list" (list of sections) or "dict" (name -> section)."""
    for arg in [annotation, *typing.get_args(annotation)]:
        origin = typing.get_origin(arg)
        if origin in (list, tuple):
            return "list"
        if origin is dict:
            return "dict"
    return "one"


def field_names(cls: type) -> list[str]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def field_annotation(cls: type, name: str) -> Any:
    if issubclass(cls, BaseModel):
        return cls.model_fields[name].annotation
    return typing.get_type_hints(cls)[name]


def _section_at(cls: type, loc: tuple[Any, ...]) -> type | None:
    """The config class of the section at `loc` (list indices and dict keys of sections skipped)."""
    model: type | None = cls
    skip_key = False
    for part in loc:
        if isinstance(part, int) or skip_key:
            skip_key = False
            continue
        if model is None or str(part) not in field_names(model):
            return None
        annotation = field_annotation(model, str(part))
        model = section_type(annotation)
        skip_key = container_of(annotation) == "dict"
    return model


def _keys_at(cls: type, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at `loc`, [] if unknown."""
    model = _section_at(cls, loc)
    return field_names(model) if model is not None else []


def _field_info(cls: type, loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo of the key at `loc`, or None."""
    model = _section_at(cls, loc[:-1]) if loc else None
    if model is None or not issubclass(model, BaseModel):
        return None
    return model.model_fields.get(str(loc[-1]))


def walk_sections(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, type]]:
    """(dotted prefix, config class) of `cls` and every section below it; a list of sections
    is `name[]`, a dict of them `name.NAME`."""
    yield prefix, cls
    for name in field_names(cls):
        annotation = field_annotation(cls, name)
        model = section_type(annotation)
        if model is None:
            continue
        kind = container_of(annotation)
        below = prefix + name + {"one": "", "list": "[]", "dict": ".NAME"}[kind]
        yield from walk_sections(model, below + ".")


# ---------------------------------------------------------------------------
# Aliases


_MISSING = object()


def _pop_dotted(data: dict[str, Any], dotted: str) -> Any:
    parts = dotted.split(".")
    parent = get_dotted(data, ".".join(parts[:-1]), _MISSING) if len(parts) > 1 else data
    if not isinstance(parent, dict) or parts[-1] not in parent:
        return _MISSING
    return parent.pop(parts[-1])


def resolve_aliases(cls: type, data: dict[str, Any], source: str = "config",
                    given_as: dict[str, str] | None = None, prefix: str = "") -> dict[str, Any]:
    """A copy of `data` with every alias key of `cls` and its sections renamed to its canonical
    key (`given_as` records canonical -> alias as given). An alias given with its target: UserError."""
    data = copy.deepcopy(data)
    _rewrite(cls, data, source, given_as if given_as is not None else {}, prefix)
    return data


def _rewrite(cls: type, data: dict[str, Any], source: str, given_as: dict[str, str], prefix: str) -> None:
    for alias, target in getattr(cls, "config_aliases", {}).items():
        value = _pop_dotted(data, alias)
        if value is _MISSING:
            continue
        if get_dotted(data, target, _MISSING) is not _MISSING:
            raise UserError(f"{source}: '{prefix}{alias}' and '{prefix}{target}' are the same setting "
                            f"('{alias}' is another name for '{target}'); give only '{prefix}{target}'")
        _set_dotted(data, target.split("."), value, f"{source}: {prefix}{alias}")
        given_as[prefix + target] = prefix + alias
    for name in field_names(cls):
        value = data.get(name)
        annotation = field_annotation(cls, name)
        model = section_type(annotation)
        if model is None or value is None:
            continue
        kind = container_of(annotation)
        if kind == "one" and isinstance(value, dict):
            _rewrite(model, value, source, given_as, f"{prefix}{name}.")
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _rewrite(model, item, source, given_as, f"{prefix}{name}.{i}.")
        elif kind == "dict" and isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dict):
                    _rewrite(model, item, source, given_as, f"{prefix}{name}.{key}.")


def aliases_of(cls: type) -> dict[str, str]:
    """Every alias in `cls` and its sections as absolute dotted keys: alias -> canonical."""
    return {prefix + alias: prefix + target
            for prefix, section in walk_sections(cls) for alias, target in getattr(section, "config_aliases", {}).items()}


# ---------------------------------------------------------------------------
# Validation messages


def _describe_validation_error(exc: ValidationError, source: str, cls: type[BaseModel] | None = None,
                               given_as: dict[str, str] | None = None) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{source}: unknown key '{key}'; {_unknown_key_hint(cls, loc)}"
    got = _shown(err.get("input"))
    named = f"key '{key}'" + (f" (given as '{given_as[key]}')" if given_as and key in given_as else "")
    if err["type"] in ("less_than_equal", "less_than") and "ctx" in err:
        bound = err["ctx"].get("le", err["ctx"].get("lt"))
        info = _field_info(cls, loc) if cls is not None else None
        extra = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
        why = f" ({extra[BOUND_REASON]})" if BOUND_REASON in extra else ""
        at_most = "at most" if err["type"] == "less_than_equal" else "below"
        return f"{source}: {named}: must be {at_most} {_number(bound)}, got {got}{why}; lower it"
    if err["type"] == "list_type" and not isinstance(err.get("input"), (dict, list)):
        value = err.get("input")
        return (f"{source}: {named}: expects a list, got {got}; write {key}=[{value}] on the command line "
                f"(several: {key}=[a,b]), or in YAML `{key.rsplit('.', 1)[-1]}: [{value}]`")
    return f"{source}: {named}: {err['msg']} (got {got})"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pydantic states a float field's bound as a float: 86,400, not 86,400.0
    return f"{value:,}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _unknown_key_hint(cls: type | None, loc: tuple[Any, ...]) -> str:
    """Where an unknown key belongs: another library's name for one of ours, a key of another
    section, or a near spelling here; else the valid keys."""
    if cls is None:
        return "remove it or check the spelling"
    name = str(loc[-1])
    where = ".".join(str(p) for p in loc[:-1])
    here = where + "." if where else ""
    for alias, target in aliases_of(cls).items():
        if alias.rsplit(".", 1)[-1] == name:
            place = "at the top level" if "." not in alias else f"as '{alias}'"
            return f"did you mean '{target}'? ('{name}' is another name for it, accepted {place} only)"
    valid = _keys_at(cls, loc[:-1])
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{here}{close[0]}'?"
    elsewhere = [f"{prefix}{name}" for prefix, section in walk_sections(cls)
                 if name in field_names(section) and "[]" not in prefix and ".NAME" not in prefix]
    if elsewhere:
        return f"did you mean '{elsewhere[0]}'? (it belongs to that section)"
    listed = f" (valid keys here: {', '.join(valid)})" if valid and len(valid) <= 12 else ""
    return f"remove it or check the spelling{listed}"


def build_config(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Validate `data` (aliases resolved) into `cls`; a bad key or value is a one-line UserError."""
    return _validate(cls, data, source, {})


def _validate(cls: type[ConfigT], data: dict[str, Any], source: str, given_as: dict[str, str]) -> ConfigT:
    data = resolve_aliases(cls, data, source, given_as)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source, cls, given_as)) from None


def load_config(
    cls: type[ConfigT],
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> ConfigT:
    """Defaults < recipe file < command-line flags < dotted KEY=VALUE overrides, validated
    into `cls`. Flags whose value is None (not given) are skipped; a flag's key may be dotted.
    The recipe's aliases are resolved before the layers above it are laid on, and an override
    may name a key by its alias, so a later layer wins whichever name each layer used."""
    data: dict[str, Any] = dict(defaults or {})
    given_as: dict[str, str] = {}
    source = "command line"
    if recipe is not None:
        source = str(recipe)
        data = _deep_merge(data, resolve_aliases(cls, read_recipe(recipe), source, given_as))
    for key, value in (flags or {}).items():  # a flag may set a nested key: "client.max_retries"
        if value is not None:
            _set_dotted(data, key.split("."), value, f"flag for {key}")
    aliases = aliases_of(cls)
    keys = [override.split("=", 1)[0].strip() for override in overrides]
    named_by: dict[str, str] = {}  # canonical key -> the alias an override gave it by
    for override, key in zip(overrides, keys):
        target = aliases.get(key) if "=" in override else None
        if target is None:
            given_as.pop(key, None)  # the recipe's alias, if any, is overridden here
        else:
            other = target if target in keys else named_by.get(target)
            if other is not None:
                raise UserError(f"command line: '{key}' and '{other}' are the same setting ('{target}'); "
                                f"give only '{target}'")
            named_by[target] = given_as[target] = key
            override = f"{target}={override.split('=', 1)[1]}"
        apply_override(data, override)
    if overrides:
        source = f"{source} (with overrides)"
    return _validate(cls, data, source, given_as)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
