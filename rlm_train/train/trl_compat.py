"""Every place rlm-train reaches past the public API of TRL (and of the transformers Trainer and the
accelerate state under it), one function each, so a TRL upgrade is checked in one file.

Written for trl==1.16.0 (`WRITTEN_FOR`, pinned in pyproject.toml) with transformers 5.17-5.19 and
accelerate 1.15. `tests/test_train_trl_compat.py` has one test per function here that fails when the
internal it relies on changes (the attribute, the method's signature, or the behaviour assumed).

What is relied on, and why:
- `GRPOTrainer._generate_and_score_completions(inputs) -> batch`: the one hook between TRL's scoring and
  its loss (the batch keys rlm-train reads and rewrites: advantages, completion_mask, tool_mask,
  num_items_in_batch, prompt_ids/mask, completion_ids, old_per_token_logps, sampling_per_token_logps);
  TRL hands rollout_func only the prompts, so the batch rows are kept here for it.
- `trainer._metrics[mode]` (defaultdict(list)): TRL averages what is appended there into each log.
- `GRPOTrainer._get_per_token_logps_and_entropies` and `trl.models.utils.disable_gradient_checkpointing`:
  the trainer's own logprobs, computed as TRL computes them.
- `trainer.eos_token_ids`: TRL's truncation test (must equal the rollout's stop ids).
- server mode: `trainer.use_vllm`, `trainer.vllm_generation` (`sync_weights`, `vllm_client` with
  `session`/`base_url`/`reset_prefix_cache`, `_iter_named_params`, `_fix_param_name_to_vllm`, `_dist`,
  `model`) and `trainer._last_loaded_step` (TRL's "pushed at this step" tag).
- TRL's VLLMClient errors: `Exception("Request failed: {status}, {body}")`.
- `TRL_EXPERIMENTAL_SILENCE`: rollout_func is experimental in TRL and says so at every trainer start.
- SFT: `Trainer.model_accepts_loss_kwargs` and TRL's `loss_is_scaled_for_ga` (our loss is already
  divided by the step's token count); transformers' `Trainer._save_checkpoint(model, trial)`.
- accelerate: `PartialState._shared_state` and `AcceleratorState._reset_state` (building TRL's config
  for a dry run without leaving a device state behind).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any, Callable, TypeVar

WRITTEN_FOR = "1.16.0"
"""The TRL version every function here was written for and is tested against."""

T = TypeVar("T")

# Launcher variables that make accelerate's state start a process group.
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def version_warning() -> str | None:
    """A warning when the installed TRL is not the one this module was written for (None when it is)."""
    try:
        installed = metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None
    if installed == WRITTEN_FOR:
        return None
    return (f"trl {installed} is installed; rlm-train reaches inside TRL {WRITTEN_FOR} (rlm_train/train/trl_compat.py): "
            f"pip install trl=={WRITTEN_FOR}, or run tests/test_train_trl_compat.py against this version")


# ---------------------------------------------------------------------------
# Trainer state


def metrics(trainer: Any, mode: str | None = None) -> Any:
    """TRL's per-log metric lists for `mode` ('train' / 'eval'; default: the model's current mode): values
    appended there are averaged into the next log line, metrics.jsonl and TensorBoard."""
    if mode is None:
        mode = "train" if trainer.model.training else "eval"
    return trainer._metrics[mode]


def has_metrics(trainer: Any) -> bool:
    """Whether `trainer` keeps TRL's metric lists (stand-in trainers in tests do not)."""
    return getattr(trainer, "_metrics", None) is not None


def eos_token_ids(trainer: Any) -> list[int]:
    """The ids TRL's GRPOTrainer counts a completion as finished by (else it is truncated)."""
    return list(trainer.eos_token_ids)


def declare_loss_scaled(trainer: Any) -> None:
    """Tell the Trainer that compute_loss takes num_items_in_batch and already divides by it, so gradient
    accumulation must not divide again."""
    trainer.model_accepts_loss_kwargs = True
    trainer.loss_is_scaled_for_ga = True


def save_checkpoint(trainer: Any) -> None:
    """Write checkpoint-{global_step}/ now (model, optimizer, scheduler, trainer state), as the Trainer
    does at a save step."""
    trainer._save_checkpoint(trainer.model, trial=None)


def silence_rollout_func_notice() -> None:
    """TRL prints an 'experimental' notice when a trainer gets a rollout_func; we pin TRL, so it is noise."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


# ---------------------------------------------------------------------------
# GRPO: the batch hook and the trainer's logprobs


def grpo_trainer_with_batch_hook() -> type:
    """TRL's GRPOTrainer with two additions on every rank: `rlm_batch_rows` holds the batch's dataset rows
    while it is generated (rollout_func reads the task of each prompt there), and
    `after_scoring(rows, batch)` sees the scored batch before the loss (it may rewrite it in place)."""
    from trl import GRPOTrainer

    class GRPOTrainerWithBatchHook(GRPOTrainer):
        rlm_batch_rows: list[dict] | None = None

        def after_scoring(self, rows: list[dict], batch: dict[str, Any]) -> None:
            """Override: runs between TRL's scoring and its loss."""

        def _generate_and_score_completions(self, inputs):
            self.rlm_batch_rows = inputs
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self.rlm_batch_rows = None
            self.after_scoring(inputs, output)
            return output

    return GRPOTrainerWithBatchHook


def trainer_logps(trainer: Any, ids: Any, attention_mask: Any, completion_length: int) -> Any:
    """The trainer's per-token logprobs of the last `completion_length` tokens [B, T], one no-grad pass as
    TRL makes it (gradient checkpointing off, TRL's temperature, its micro-batching)."""
    import torch
    from trl.models.utils import disable_gradient_checkpointing

    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention_mask, completion_length,
            batch_size=trainer.args.per_device_train_batch_size)
    return logps


def unwrap_for_generation(trainer: Any) -> Any:
    """Context manager: the trainer's model ready for `generate` (gathered under ZeRO-3, checkpointing off)."""
    from trl.models import unwrap_model_for_generation

    return unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                       gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)


# ---------------------------------------------------------------------------
# GRPO server mode (vLLM)


def server_generation(trainer: Any) -> Any | None:
    """TRL's VLLMGeneration of a trainer in vLLM server mode, None otherwise."""
    return trainer.vllm_generation if getattr(trainer, "use_vllm", False) else None


def push_weights_now(trainer: Any) -> None:
    """Server mode: push the current weights (TRL pushes only before a rollout) and tag the step as pushed,
    so the next rollout of the same step skips its push. Every rank calls it."""
    generation = server_generation(trainer)
    if generation is not None and trainer._last_loaded_step != trainer.state.global_step:
        generation.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step


def install_ordered_weight_sync(vllm_generation: Any, accelerator: Any, reset_timeout_s: float = 120.0) -> None:
    """Make TRL's server-mode weight push ordered and checked (train/grpo_weight_sync.py says why): rank 0's
    prefix-cache reset checked, LoRA merged out of place where parameters are whole, and a barrier after
    every push. Idempotent."""
    from rlm_train.train.grpo_weight_sync import iter_merged_params, reset_prefix_cache_checked

    if getattr(vllm_generation, "rlm_ordered_sync", False):
        return
    client = getattr(vllm_generation, "vllm_client", None)  # rank 0 only
    if client is not None:
        client.reset_prefix_cache = lambda: reset_prefix_cache_checked(client.session, client.base_url,
                                                                        reset_timeout_s)
    if _can_merge_out_of_place(vllm_generation):
        vllm_generation._iter_named_params = lambda: iter_merged_params(
            vllm_generation.model, vllm_generation._fix_param_name_to_vllm)
    push = vllm_generation.sync_weights

    def ordered_sync() -> None:
        push()  # rank 0: push, then the checked reset; other ranks: their part of any parameter gathers
        accelerator.wait_for_everyone()  # no rank starts an episode before the new weights are in

    vllm_generation.sync_weights = ordered_sync
    vllm_generation.rlm_ordered_sync = True


def _can_merge_out_of_place(vllm_generation: Any) -> bool:
    """PEFT LoRA on whole (unsharded) parameters: FSDP and ZeRO-3 need TRL's gather-then-merge path."""
    from accelerate.utils import is_peft_model

    dist = getattr(vllm_generation, "_dist", None)
    sharded = dist is not None and (dist.is_fsdp or dist.is_zero3)
    return is_peft_model(vllm_generation.model) and not sharded


_REFUSED = re.compile(r"Request failed: 4(00|13|22)\b")


def refused_by_server(exc: BaseException) -> bool:
    """A 4xx the vLLM server gave one request (TRL's VLLMClient raises a bare Exception naming the
    status), as opposed to a server or connection that is broken."""
    return bool(_REFUSED.match(str(exc)))


# ---------------------------------------------------------------------------
# TRL's config for a dry run


def build_without_device_state(build: Callable[[], T]) -> T:
    """`build()` (a TRL config whose __post_init__ sets up accelerate's device state) without starting a
    process group and without leaving a state behind for the real run to inherit."""
    from accelerate.state import AcceleratorState, PartialState

    fresh = not PartialState._shared_state
    hidden = {name: os.environ.pop(name) for name in _DISTRIBUTED_ENV if name in os.environ}
    try:
        return build()
    finally:
        os.environ.update(hidden)
        if fresh:
            AcceleratorState._reset_state(reset_partial_state=True)

