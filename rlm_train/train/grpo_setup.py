"""Checks and set-up `run_grpo` does before training: the one stop-token set, the chat template's
turn-by-turn extension (thinking blocks included), LoRA dropout off, and resuming (which checkpoint,
whether its config matches, and trimming the logs of steps that will be trained again)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError

# Config keys a resumed run may change: how long it runs and how it logs or talks to servers,
# never what it trains on or how.
RESUME_MAY_CHANGE = (
    "resume", "training.max_steps", "training.logging_steps", "training.save_steps", "training.save_total_limit",
    "report_to", "num_threads", "rollout.vllm_server_url", "rollout.vllm_server_timeout_s", "rollout.concurrency",
    "rollout.batch_wait_s", "rollout.client", "launch", "requires", "evaluation", "save_merged", "merged_dtype",
    "run_name", "wandb_project", "training.ddp_timeout", "push_to_hub", "hub_model_id", "hub_private_repo",
)


# ---------------------------------------------------------------------------
# Stop tokens


def stop_token_ids(tokenizer: Any, model_path: Path) -> list[int]:
    """The one set of ids that end a turn, used by the rollout's generation (transformers and vLLM) and by
    TRL (trainer.eos_token_ids: what counts as truncated): the chat template's end-of-turn token, the
    tokenizer's EOS and every EOS the model's generation_config.json declares.

    Refuses a template whose assistant turns do not end with one of them: the model could never end a
    turn where the template ends it."""
    from rlm_train.models.loading import end_of_turn_ids

    ids = list(end_of_turn_ids(tokenizer))
    template_end = _template_turn_end(tokenizer)
    if template_end is None or template_end not in ids:
        shown = tokenizer.decode([template_end]) if template_end is not None else "plain text"
        raise UserError(
            f"chat template: an assistant turn ends with {shown!r}, which is not a stop token of this tokenizer "
            f"(EOS {tokenizer.eos_token!r}); use the template made for this model (qwen3, gemma3)")
    generation_file = model_path / "generation_config.json"
    if generation_file.is_file():
        declared = json.loads(generation_file.read_text()).get("eos_token_id")
        for token in ([declared] if isinstance(declared, int) else declared or []):
            if token not in ids:
                ids.append(int(token))
    return ids


def _template_turn_end(tokenizer: Any) -> int | None:
    """The first token the template writes after an assistant turn's content (None: no special token)."""
    from rlm_train.models.loading import render_chat

    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = render_chat(tokenizer, sample[:1], add_generation_prompt=True)
    tail = render_chat(tokenizer, sample)[len(prompt):].split("Hello", 1)[-1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def apply_stop_ids(model: Any, stop_ids: list[int]) -> None:
    """Make the model's generation config list every stop id (TRL reads it when the trainer is built)."""
    model.generation_config.eos_token_id = list(stop_ids)


def check_trainer_stop_ids(trainer: Any, stop_ids: list[int]) -> None:
    """TRL's truncation test must use the same set as the rollout (else every episode reads as cut)."""
    from rlm_train.train.trl_compat import eos_token_ids

    have = set(eos_token_ids(trainer))
    if have != set(stop_ids):
        raise RuntimeError(f"TRL's end-of-sequence ids {sorted(have)} differ from the rollout's stop ids "
                           f"{sorted(stop_ids)}; every episode would count as truncated")


# ---------------------------------------------------------------------------
# The chat template


def check_template_extends(tokenizer: Any) -> None:
    """The rollout builds turn k+1's prompt by extending turn k's; the template must render history
    verbatim, thinking blocks included (Qwen3's own template drops past <think> blocks)."""
    from rlm_train.models.loading import render_chat

    first = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    replies = {
        "plain": "\n```repl\nprint(1)\n```\n",  # sampled text may start or end with whitespace
        "thinking": "<think>\nlook at the context first\n</think>\n\n```repl\nprint(1)\n```",
    }
    for kind, reply in replies.items():
        later = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "REPL output:\n1"}]
        a = render_chat(tokenizer, first, add_generation_prompt=True) + reply
        b = render_chat(tokenizer, later, add_generation_prompt=True)
        if not b.startswith(a):
            what = "drops or rewrites past <think> blocks" if kind == "thinking" else "strips or rewrites them"
            raise UserError(
                f"the chat template does not render past assistant turns exactly as they were generated (it {what}), "
                "so multi-turn episodes cannot be trained token-exactly; set chat_template to qwen3 or gemma3 (ours) "
                "or a .jinja file that keeps history verbatim"
            )


# ---------------------------------------------------------------------------
# LoRA


def lora_dropout_off(model: Any) -> int:
    """Replace every LoRA dropout with identity (GRPO's ratio compares two forward passes of the same
    tokens; dropout makes them differ by noise). Returns how many were on."""
    import torch

    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if not isinstance(layer, torch.nn.Identity):
                    dropouts[name] = torch.nn.Identity()
                    changed += 1
    peft_config = getattr(model, "peft_config", None) or {}
    for adapter_config in peft_config.values():
        if getattr(adapter_config, "lora_dropout", 0):
            adapter_config.lora_dropout = 0.0
    return changed


# ---------------------------------------------------------------------------
# Resume


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_step(checkpoint: Path) -> int:
    state = checkpoint / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("global_step", 0))
    return int(checkpoint.name.split("-")[-1])


def find_resume(cfg: Any, source: str) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after checking it belongs to this config.
    Raises before anything is loaded: a resume dir from another config names the differing keys."""
    out = Path(cfg.output_dir)
    found = checkpoints(out) if out.is_dir() else []
    if cfg.resume == "never":
        if found:
            raise UserError(f"{source}: output_dir {out} already holds {found[-1].name} of an earlier run and "
                            "resume=never; set resume=auto to continue it, or choose a new output_dir")
        return None
    if cfg.resume == "auto":
        checkpoint = found[-1] if found else None
    else:
        checkpoint = Path(cfg.resume).expanduser()
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError(f"{source}: resume={cfg.resume}: not a checkpoint directory (no trainer_state.json)")
    if checkpoint is not None:
        from rlm_train.train.runtime import check_resume_config

        check_resume_config(cfg, "grpo", str(checkpoint), RESUME_MAY_CHANGE)
    return checkpoint


def trim_logs_for_resume(out: Path, step: int, rollout_log: Any) -> dict[str, int]:
    """Drop log records of steps the resumed run will train again (main process): rollouts generated at
    grpo_step >= step, metrics logged after step. Starting fresh (step 0) clears both."""
    from rlm_train.train.common import is_main_process
    from rlm_train.train.grpo_episodes import trim_jsonl

    if not is_main_process():
        return {}
    return {
        "rollouts": rollout_log.keep_below_step(step),
        "metrics": trim_jsonl(out / "metrics.jsonl", lambda rec: rec.get("step", 0) <= step and step > 0),
    }
