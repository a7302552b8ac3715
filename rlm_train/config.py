"""Typed configs: pydantic models loaded from YAML recipes with dotted overrides.

    cfg = load_config(SFTConfig, "recipes/tiny-cpu-sft.yaml", ["training.learning_rate=1e-4"])

Unknown keys are errors that name the key and the file; so are wrong types.
"""

from __future__ import annotations

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


def _set_dotted(data: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{source}: unknown key '{key}'; remove it or check the spelling"
    return f"{source}: key '{key}': {err['msg']} (got {err.get('input')!r})"


def build_config(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source)) from None


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
