"""Config pieces SFT and GRPO share: LoRA, the optimizer loop, hardware needs, launch.
What their runs share (and the plan's footer) is in `runtime`."""

from __future__ import annotations

from pydantic import Field

from rlm_train.config import StrictModel


class LoraSettings(StrictModel):
    enabled: bool = True
    """Train a LoRA adapter (PEFT); false trains every weight."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input; 0 is fastest and keeps sampling and training logprobs identical."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: 'all-linear' (every linear layer but the output head) or a list of names."""


class OptimizerLoopSettings(StrictModel):
    """The fields every trainer has; SFT and GRPO subclass it with their own defaults and extras."""

    batch_size: int = Field(1, ge=1)
    """Samples (SFT) or episodes (GRPO) per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: saves memory on big models, costs ~30% speed."""
    logging_steps: int = Field(1, ge=1)
    """Log metrics every N optimizer steps."""
    save_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every N optimizer steps."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (null keeps all)."""
    seed: int = 0
    """Seed for shuffling, LoRA init and sampling."""
    shuffle: bool = True
    """Shuffle the data each epoch."""


class Requirements(StrictModel):
    gpus: int = Field(0, ge=0)
    """CUDA GPUs the training processes need visible; a real run stops at once if fewer are."""
    vllm: bool = False
    """Whether the job needs the vllm package importable (GRPO's server mode does)."""


class LaunchSettings(StrictModel):
    accelerate_config: str | None = None
    """accelerate config YAML for multi-GPU runs (FSDP/DeepSpeed); shown in the plan, used by `accelerate launch`."""
    num_processes: int = Field(1, ge=1)
    """Training processes (one per GPU) the launch command starts."""


def lora_config(lora: LoraSettings):
    """PEFT LoraConfig for a causal LM from our settings."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM", bias="none")
