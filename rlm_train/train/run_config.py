"""The fields of a training run that SFT and GRPO share: what model, where the outputs go, on what
hardware and dtype, LoRA, resuming, the merged copy, evaluation, metric sinks and the launch.
`SFTConfig` (train/sft.py) and `GRPOConfig` (train/grpo_config.py) extend `TrainingRunConfig` with
their data, their `training` section and their own sections.

TRL and transformers users write their configs flat (`learning_rate`, `num_train_epochs`); ours
keeps them in the `training` section. `config_aliases` maps TRL's names to ours where the meaning
is the same (rlm_train.config rewrites them before validation; `rlm-train config STAGE` lists them).
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, ClassVar, Iterator, Literal

from pydantic import model_validator

from rlm_train.config import StrictModel
from rlm_train.errors import UserError
from rlm_train.rollouts.tracking import ReportTo, check_tracking
from rlm_train.train.common import LaunchSettings, LoraSettings, OptimizerLoopSettings, Requirements
from rlm_train.train.evaluation import EvaluationSettings

# TRL/transformers TrainingArguments names of `training` keys, written at the top level as TRL has them.
# Keys whose name is already TRL's (learning_rate, warmup_steps, ...) are listed too: flat, they are aliases.
TRL_TRAINING_ALIASES: dict[str, str] = {
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler",
    "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "logging_steps": "training.logging_steps",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "seed": "training.seed",
    "max_steps": "training.max_steps",
}


class TrainingRunConfig(StrictModel):
    """What every `rlm-train sft` / `rlm-train grpo` config has (the recipe's top-level keys)."""

    config_aliases: ClassVar[dict[str, str]] = {
        **TRL_TRAINING_ALIASES,
        "model_name_or_path": "model",  # TRL's ModelConfig
        "bf16": "amp_bf16",
        "hub_private": "hub_private_repo",
    }

    model: str
    """The model to train: a Hugging Face model directory (e.g. a merged SFT output), a Hub id in the Hugging
    Face cache ('Qwen/Qwen3-8B', `hf download` puts it there), or 'gemma3-270m' (the packaged weights)."""
    output_dir: str
    """Where checkpoints (checkpoint-N/), the adapter (adapter/) or full weights (model/), merged/, metrics.jsonl,
    TensorBoard events, summary.json and the resolved config ({stage}_config.json) go."""
    chat_template: str = "auto"
    """'auto' (ours for Qwen3/Gemma-3), 'qwen3', 'gemma3', 'model' (the tokenizer's own) or a .jinja file.
    GRPO needs one that extends turn by turn (ours do)."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Where to train; 'cuda' with no GPU stops at once; 'auto' uses CUDA when present."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype of the weights: float32 on this AVX2 CPU (bf16 matmuls are several times slower),
    bfloat16 on GPUs."""
    amp_bf16: bool = False
    """bf16 autocast for compute on GPUs while weights stay in `dtype` (TRL's `bf16`; full fine-tuning:
    dtype=float32 master weights + this)."""
    attn_implementation: str = "sdpa"
    """Attention kernel. sdpa/eager need nothing installed; with SFT's training.batch_size 1 a row is one sample
    and needs no mask, while packed rows become a dense LxL mask (refused over 16k tokens a row).
    flash_attention_2 (GPUs, the flash-attn package compiled for this torch) reads packed rows as varlen, no mask."""
    num_threads: int | None = None
    """torch CPU threads; null leaves torch's default. Measure (rlm-train bench train): one thread can beat two."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings; lora.enabled=false trains every weight (full fine-tuning)."""
    training: OptimizerLoopSettings = OptimizerLoopSettings()
    """Optimizer, schedule, checkpointing (each trainer's own section extends it)."""
    resume: Literal["auto", "never"] | str = "auto"
    """'auto' resumes from the newest checkpoint-N in output_dir (its config must match this one), 'never' starts
    fresh (GRPO refuses it when output_dir already holds checkpoints), or a checkpoint path."""
    save_merged: bool = False
    """Also write merged/: the trained adapter folded into the base, a plain model directory for servers without
    LoRA support or the next stage. Needs lora.enabled."""
    merged_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of merged/ on disk (bf16 halves it and is what vLLM serves)."""
    evaluation: EvaluationSettings = EvaluationSettings()
    """Validation loss (SFT), held-out RLM episodes every evaluation.every_steps steps (evaluation.tasks) with their
    score logged per family, and which checkpoint adapter/ (and merged/) keep."""
    report_to: ReportTo = ["tensorboard"]
    """Metric sinks besides stdout and metrics.jsonl (always written): tensorboard, wandb, a list of both, or
    'none' (TRL's spelling). A sink that is not installed is refused by the dry run."""
    run_name: str | None = None
    """Run name in TensorBoard / W&B (default: the output directory's name)."""
    wandb_project: str | None = None
    """W&B project; setting it turns W&B on (WANDB_API_KEY or `wandb login` as usual; pip install 'rlm-train[wandb]')."""
    push_to_hub: bool = False
    """Upload the final model (merged/, else model/, else adapter/) with its model card to the Hugging Face Hub
    when the run finishes (TRL's name); a missing token stops the run before training (`hf auth login`)."""
    hub_model_id: str | None = None
    """The Hub repo to push to, org/name or name (default: the output directory's name, under your account)."""
    hub_private_repo: bool = False
    """Create the Hub repo private (TRL's name)."""
    requires: Requirements = Requirements()
    """Hardware the recipe needs; checked before any loading."""
    launch: LaunchSettings = LaunchSettings()
    """How a multi-process run is launched (informational for the plan)."""

    @model_validator(mode="after")
    def _merged_needs_lora(self) -> "TrainingRunConfig":
        if self.save_merged and not self.lora.enabled:
            raise ValueError("save_merged needs lora.enabled=true (full fine-tuning already saves a full model)")
        return self


def check_run_config(cfg: TrainingRunConfig, source: str, trl_args: Callable[[], Any] | None = None) -> None:
    """What the real run would refuse on the GPU node, refused now as one line: metric sinks that are not
    installed (report_to, wandb_project), a scheduler transformers does not know, and, given `trl_args`
    (a dry run: it builds TRL's config with the run's values), whatever TRL's and transformers' own
    checks refuse. TRL's config is built for the CPU, starting no process group and leaving no device state."""
    check_tracking(cfg)
    check_lr_scheduler(cfg.training.lr_scheduler, source)
    if cfg.push_to_hub:  # a missing token fails here, not after training
        from rlm_train.cards import check_hub_token

        check_hub_token(f"{source}: push_to_hub")
    if trl_args is None:
        return
    from rlm_train.train.trl_compat import build_without_device_state

    with trl_arguments_errors(source):
        build_without_device_state(trl_args)


def check_lr_scheduler(name: str, source: str) -> None:
    """training.lr_scheduler must be one of transformers' SchedulerType names (the closest one suggested)."""
    from transformers.trainer_utils import SchedulerType

    known = [s.value for s in SchedulerType]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{source}: training.lr_scheduler={name!r} is not a transformers scheduler; {hint}"
                        f"one of: {', '.join(known)}")


@contextlib.contextmanager
def trl_arguments_errors(source: str) -> Iterator[None]:
    """An error TRL's or transformers' config raises becomes one UserError line naming `source`."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{source}: TRL's training arguments refuse these settings: {first}") from None
