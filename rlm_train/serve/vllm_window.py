"""vLLM's window (--max-model-len): the flag as given, the longest window a model holds (its
positions, stretched by rope scaling), and the window a server gets for the longest request its
clients can send (`fit_window`): the smaller of that and the model's positions. When the clients'
RLM config is known (serve's own gateway), a smaller window lowers it so that every request fits
(`fit_rlm_to_window`: the sub-call prompt, then the root turns), saying so in one line. The
launcher, the pipeline's chain check and GRPO's server line all size windows here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlm_train.errors import UserError
from rlm_train.stage import Note, info, warning

if TYPE_CHECKING:
    from rlm_train.rlm import RLMConfig


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
    rlm: RLMConfig | None = None
    """The clients' RLM config, when this launch runs them (serve's gateway): lowered to fit a
    smaller window instead of sending requests the server refuses."""


def fit_window(args: list[str], model_dir: Path | None, env: dict[str, str], need: WindowNeed | None,
               notes: list[Note]) -> tuple[list[str], RLMConfig | None]:
    """vLLM's flags with the window checked and, given `need`, sized; and `need.rlm` lowered to
    that window (None: unchanged). A --max-model-len longer than the model's positions is refused
    (vLLM would not start); with none given, the smaller of `need` and the positions is added; a
    window below `need` lowers `need.rlm` with one line saying what that caps, or (no config to
    lower) warns that longer turns and sub-calls are refused mid-episode."""
    given = max_model_len_arg(args, "--vllm-args")
    positions = None if model_dir is None or long_windows_allowed(env) else model_positions(model_dir, args)
    if given is not None and positions is not None and given > positions:
        raise UserError(f"--vllm-args: --max-model-len {given} is longer than the {positions} positions of {model_dir} "
                        f"(its config.json), which vLLM refuses; lower it, or enable rope scaling (--hf-overrides)")
    if need is None:
        return list(args), None
    window = given if given is not None else need.tokens if positions is None else min(need.tokens, positions)
    sized = list(args) if given is not None else [*args, "--max-model-len", str(window)]
    if window >= need.tokens:
        if given is None:
            notes += info(f"vLLM --max-model-len {window}: sized for {need.who} (its longest root turn and sub-call; "
                          "rlm_train/rlm/window.py)")
        return sized, None
    why = f"the model's {positions} positions" if given is None else "as given in --vllm-args"
    if need.rlm is not None:
        fitted, caps = fit_rlm_to_window(need.rlm, window, need.budgets)
        notes.append(warning(f"vLLM --max-model-len {window} ({why}; {need.who} asks {need.tokens}): {caps}"))
        return sized, fitted
    remedy = f"lower {need.budgets}.sub_model_chars / root_max_tokens / max_iterations"
    notes.append(warning(f"vLLM --max-model-len {window} ({why}) is below the {need.tokens} tokens {need.who} can "
                 f"send in one request; longer turns and sub-calls are refused mid-episode ({remedy})"))
    return sized, None


def fit_rlm_to_window(rlm: RLMConfig, window: int, budgets: str) -> tuple[RLMConfig, str]:
    """`rlm` with its sub-call prompt (sub_model_chars) lowered so a sub-call fits `window` tokens
    (the loop then refuses a longer prompt before sending it, and says so to the REPL), and one
    line saying what the window caps: that, and how many root turns fit at their longest (the
    turns are not lowered: most are far shorter than root_max_tokens + feedback_chars)."""
    from rlm_train.rlm.window import CHARS_PER_TOKEN, MESSAGE_TOKENS, root_tokens, sub_call_tokens

    caps = []
    fitted = rlm
    if sub_call_tokens(fitted) > window:
        chars = max(1000, int((window - MESSAGE_TOKENS - fitted.sub_max_tokens) * CHARS_PER_TOKEN))
        fitted = fitted.model_copy(update={"sub_model_chars": chars})
        caps.append(f"a sub-call's prompt at {chars:,} characters ({budgets}.sub_model_chars "
                    f"{rlm.sub_model_chars:,} -> {chars:,})")
    if sub_call_tokens(fitted) > window:
        caps.append(f"a sub-call still needs {sub_call_tokens(fitted)} tokens: lower {budgets}.sub_max_tokens")
    if root_tokens(fitted) > window:
        turns = fitted.max_iterations
        while turns > 0 and root_tokens(fitted.model_copy(update={"max_iterations": turns})) > window:
            turns -= 1
        caps.append(f"a root conversation at {turns} of its {fitted.max_iterations} turns at their longest "
                    f"(root_max_tokens + feedback_chars each; a longer one ends its episode as a model error: lower "
                    f"{budgets}.max_iterations / root_max_tokens / feedback_chars to avoid it)")
    return fitted, "caps " + "; and ".join(caps)
