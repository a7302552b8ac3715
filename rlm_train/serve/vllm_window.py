"""vLLM's window (--max-model-len): the flag as given, the longest window a model holds (its
positions, stretched by rope scaling), and the window a server gets for the longest request its
clients can send (`fit_window`). The launcher, the pipeline's chain check and GRPO's server line
all size windows here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def max_model_len_arg(args: list[str], where: str) -> int | None:
    """The --max-model-len value in vLLM flags (either spelling), else None."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--max-model-len=") else \
            (args[i + 1] if arg == "--max-model-len" and i + 1 < len(args) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise UserError(f"{where}: --max-model-len {value!r} is not a whole number of tokens") from None
    return None


def model_positions(model: str | Path, args: list[str]) -> int | None:
    """The longest window vLLM accepts for a model spec or directory (None: not known on this
    machine; nothing is converted or downloaded): its max_position_embeddings, stretched by the
    rope scaling of its config.json or of `--hf-overrides` in `args` (YaRN:
    original_max_position_embeddings x factor)."""
    from rlm_train.models import loading

    text = str(model)
    if text == loading.GEMMA3_270M:
        model_dir = loading.cache_root() / "models" / "gemma3-270m-bf16"
    elif loading.model_missing(text):
        return None
    else:
        model_dir = loading.resolve_model(text)
    file = model_dir / "config.json"
    if not file.is_file():
        return None
    config = read_json_object(file)
    config = {**config, **config.get("text_config", {})}
    for i, arg in enumerate(args):
        given = arg.split("=", 1)[1] if arg.startswith("--hf-overrides=") else \
            (args[i + 1] if arg == "--hf-overrides" and i + 1 < len(args) else None)
        if given is not None:
            try:
                overrides = json.loads(given)
            except ValueError:
                continue
            if isinstance(overrides, dict):
                config = {**config, **overrides}
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    kind = str(rope.get("rope_type") or rope.get("type") or "") if isinstance(rope, dict) else ""
    if isinstance(factor, (int, float)) and factor > 1 and kind not in ("su", "longrope", "llama3", "default"):
        original = rope.get("original_max_position_embeddings") if kind == "yarn" else None
        positions = int((original if isinstance(original, int) else positions) * factor)
    return positions


def long_windows_allowed(env: dict[str, str]) -> bool:
    """vLLM's own escape hatch for a window past the model's positions (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)."""
    return str({**os.environ, **env}.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0")).strip().lower() in ("1", "true")


@dataclass
class WindowNeed:
    """The longest request a server's clients can send: `tokens`, what sends it (`who`), and the
    config section whose budgets set it (`budgets`, named in the remedy)."""

    tokens: int
    who: str
    budgets: str


def fit_window(args: list[str], model_dir: Path | None, env: dict[str, str], need: WindowNeed | None,
               notes: list[str]) -> list[str]:
    """vLLM's flags with the window checked and, given `need`, sized: a --max-model-len longer than
    the model's positions is refused (vLLM would not start); with none given, one fitting `need` is
    added (at most the model's positions, with a warning when that is less); a smaller one given is
    kept, with a warning, since longer turns and sub-calls are refused mid-episode."""
    given = max_model_len_arg(args, "--vllm-args")
    positions = None if model_dir is None or long_windows_allowed(env) else model_positions(model_dir, args)
    if given is not None and positions is not None and given > positions:
        raise UserError(f"--vllm-args: --max-model-len {given} is longer than the {positions} positions of {model_dir} "
                        f"(its config.json), which vLLM refuses; lower it, or enable rope scaling (--hf-overrides)")
    if need is None:
        return list(args)
    remedy = f"lower {need.budgets}.sub_model_chars / root_max_tokens / max_iterations"
    if given is None:
        window = need.tokens if positions is None else min(need.tokens, positions)
        if window < need.tokens:
            notes.append(f"warning: vLLM --max-model-len {window}: the model holds {positions} positions, fewer than the "
                         f"{need.tokens} tokens {need.who} can send in one request; longer turns and sub-calls are "
                         f"refused mid-episode ({remedy})")
        else:
            notes.append(f"vLLM --max-model-len {window}: sized for {need.who} (its longest root turn and sub-call; "
                         "rlm_train/rlm/window.py)")
        return [*args, "--max-model-len", str(window)]
    if given < need.tokens:
        notes.append(f"warning: vLLM --max-model-len {given} is below the {need.tokens} tokens {need.who} can send in "
                     f"one request; longer turns and sub-calls are refused mid-episode (drop the flag to size it, or "
                     f"{remedy})")
    return list(args)
