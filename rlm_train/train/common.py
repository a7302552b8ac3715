"""What SFT and GRPO share: config pieces (LoRA, the optimizer loop, hardware needs, launch) and the
multi-process helpers (one writer, barriers, metrics summed over ranks). What their runs share
(and the plan's footer) is in `runtime`."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, ClassVar, TypeVar

from pydantic import Field, model_validator

from rlm_train.config import StrictModel

T = TypeVar("T")


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

    # TRL/transformers TrainingArguments names that differ from ours (the same meaning).
    config_aliases: ClassVar[dict[str, str]] = {"per_device_train_batch_size": "batch_size",
                                                "lr_scheduler_type": "lr_scheduler"}

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
    """Recompute activations in backward: saves memory on big models, costs training speed."""
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

    @model_validator(mode="after")
    def _schedule_honours_warmup(self) -> "OptimizerLoopSettings":
        # transformers' 'constant' schedule ignores warmup_steps without a word.
        if self.warmup_steps > 0 and self.lr_scheduler == "constant":
            raise ValueError(f"lr_scheduler 'constant' ignores warmup_steps={self.warmup_steps}; "
                             "use 'constant_with_warmup' (or set warmup_steps: 0)")
        return self


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


# ---------------------------------------------------------------------------
# Several training processes (torchrun / accelerate launch): one writer, everyone waits.
# Before the process group exists, the launcher's RANK / LOCAL_RANK variables say who is who.


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def leave_process_group() -> None:
    """Destroy the process group (if any) before the interpreter exits: a gloo group left for the
    interpreter's exit to tear down can abort a process that finished its run (`terminate called
    without an active exception`), turning a good exit into SIGABRT. Training runs call it through
    `leaves_process_group`; nothing else should need to."""
    dist = _dist()
    if dist:
        dist.destroy_process_group()


def leaves_process_group(run: Callable[..., T]) -> Callable[..., T]:
    """A whole training run (run_sft, run_grpo) that leaves its process group however it ends:
    the one place a training process shuts its group down."""

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return run(*args, **kwargs)
        finally:
            leave_process_group()

    return wrapper


def process_rank() -> int:
    """This process's global rank (0 when not launched with several processes)."""
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Training processes on this node (the launcher's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """True on the one process that writes logs, metrics, adapters, merged models and summaries."""
    return process_rank() == 0


def wait_for_everyone() -> None:
    """Barrier across training processes (a no-op in a single process): after the main process
    wrote something the others read, or before a stage ends."""
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run `fn` on the main process only (the others get None), then wait for everyone, so no
    process reads a file before it exists and no two processes write the same file. When `fn`
    raises, every process raises (see fail_together)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fail_together(lambda: fn(*args, **kwargs) if is_main_process() else None, fn.__name__)

    return wrapper


def fail_together(action: Callable[[], T], what: str) -> T:
    """Run `action` on every process, then agree on how it went (a collective in place of a barrier):
    when it raised on any process, every process raises, the one it failed on with its own error and
    the others with one naming it, instead of waiting at the next collective for a process that is gone."""
    try:
        result, error = action(), None
    except Exception as exc:
        result, error = None, exc
    dist = _dist()
    if dist and dist.get_world_size() > 1 and sum_over_processes(float(error is not None)) > 0:
        # Only when some process failed do all of them exchange messages: the common path stays one
        # small all-reduce, as cheap as the barrier it replaces.
        reports: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        failed = next(((rank, report) for rank, report in enumerate(reports) if report), None)
        if error is None and failed is not None:
            raise RuntimeError(f"{what} failed on process {failed[0]}: {failed[1]}")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def main_print(*args: Any, **kwargs: Any) -> None:
    """print() on the main process only (one log line per event, not one per rank)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def sum_over_processes(value: float) -> float:
    """`value` summed over every training process (the same number on each; collective: all must call)."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return value
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_from_main(obj: T) -> T:
    """The main process's `obj` on every process (collective: all must call)."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
