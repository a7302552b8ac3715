"""Typed configs: pydantic models loaded from YAML recipes with dotted overrides.

    cfg = load_config(SFTConfig, "recipes/tiny-cpu-sft.yaml", ["training.learning_rate=1e-4"])

Unknown keys are errors that name the key and the file, with the closest valid key when
one is close; so are wrong types.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlm_train.errors import UserError


class StrictModel(BaseModel):
    """Base for every config: unknown keys are rejected, fields are documented."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


ConfigT = TypeVar("ConfigT", bound=StrictModel)


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
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of config keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {override!r}: empty key segment")
    _set_dotted(data, parts, yaml.safe_load(raw) if raw.strip() else "", f"override {override!r}")


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


def _describe_validation_error(exc: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = _keys_at(cls, err["loc"][:-1]) if cls is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1, cutoff=0.6)
        if close:
            where = ".".join(str(p) for p in err["loc"][:-1])
            return f"{source}: unknown key '{key}'; did you mean '{where + '.' if where else ''}{close[0]}'?"
        listed = f" (valid keys here: {', '.join(valid)})" if valid and len(valid) <= 12 else ""
        return f"{source}: unknown key '{key}'; remove it or check the spelling{listed}"
    got = repr(err.get("input"))
    return f"{source}: key '{key}': {err['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})"


def _keys_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at `loc` (list indices skipped), [] if unknown."""
    model: type[BaseModel] | None = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds: itself, or inside Optional[...] / list[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def build_config(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source, cls)) from None


def load_config(
    cls: type[ConfigT],
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> ConfigT:
    """Defaults < recipe file < command-line flags < dotted KEY=VALUE overrides, validated
    into `cls`. Flags whose value is None (not given) are skipped; a flag's key may be dotted."""
    data: dict[str, Any] = dict(defaults or {})
    source = "command line"
    if recipe is not None:
        data = _deep_merge(data, read_recipe(recipe))
        source = str(recipe)
    for key, value in (flags or {}).items():  # a flag may set a nested key: "client.max_retries"
        if value is not None:
            _set_dotted(data, key.split("."), value, f"flag for {key}")
    for override in overrides:
        apply_override(data, override)
    if overrides:
        source = f"{source} (with overrides)"
    return build_config(cls, data, source)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
