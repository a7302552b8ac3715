"""Evaluation during training, shared by SFT and GRPO: validation loss on the split `rlm-train
filter` holds out, held-out RLM episodes through `rlm_train.eval` (the same loop, store and report
as `rlm-train eval`) with the model being trained as the root policy, checkpoint selection by
either, and the metric sinks (TensorBoard by default, W&B when configured, metrics.jsonl always).

A trainer subclass calls `evaluate_and_score(trainer, metrics)` at the end of its `evaluate`;
`trainer_eval_args(settings, ...)` gives the TrainingArguments fields that schedule it and keep
the best checkpoint (transformers then loads the best weights at the end, so the adapter/ or
model/ the next stage reads is the selected one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rlm_train.config import StrictModel, bounded
from rlm_train.errors import UserError
from rlm_train.rlm.loop import RLMConfig
from rlm_train.rollouts.tracking import TENSORBOARD_DIR, Tracked, wanted_sinks
from rlm_train.train.common import broadcast_from_main, is_main_process

RLM_METHOD = "trained"
"""The method name of the in-training eval runs (OUT/eval/step-N/runs/trained/)."""


class EvaluationSettings(StrictModel):
    """What is measured while training, how often, and which checkpoint is kept."""

    every_steps: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (validation loss, and RLM episodes when `tasks` is set); 0: never."""
    validation: str = "auto"
    """Validation samples: 'auto' (the dataset's validation split that filter writes, when present), 'none', or a path."""
    batch_size: int = Field(1, ge=1)
    """Validation samples per packed micro-batch."""
    tasks: list[str] = Field(default_factory=list)
    """Held-out task files (rlm-train/task/v1 JSONL): RLM episodes with the model being trained as the root policy."""
    samples: int = bounded(1, ge=1, le=10_000, why="every evaluation runs them all, and training waits for it")
    """Episodes per held-out task at each evaluation."""
    sub_policy: str = "scripted"
    """Policy answering the episodes' sub-calls: scripted, oracle, openai:MODEL (with sub_base_urls), or 'same'."""
    sub_base_urls: list[str] = Field(default_factory=list)
    """Servers for an openai: sub_policy."""
    rlm: RLMConfig = Field(default_factory=lambda: RLMConfig(temperature=0.0))
    """How the held-out episodes run (greedy by default, so scores compare across steps)."""
    select_best: Literal["auto", "rlm_score", "eval_loss", "none"] = "auto"
    """Which evaluated checkpoint the run's adapter/ (or model/) holds at the end: 'auto' is rlm_score
    when `tasks` is set, eval_loss when there is a validation split, else the last step."""


# ---------------------------------------------------------------------------
# Scheduling and selection (TrainingArguments fields)


def selection_metric(settings: EvaluationSettings, has_validation: bool) -> str | None:
    """'rlm_score', 'eval_loss' or None (keep the last weights)."""
    if settings.every_steps == 0 or settings.select_best == "none":
        return None
    if settings.select_best == "auto":
        return "rlm_score" if settings.tasks else ("eval_loss" if has_validation else None)
    if settings.select_best == "rlm_score" and not settings.tasks:
        raise UserError("evaluation.select_best=rlm_score needs evaluation.tasks (held-out task files)")
    if settings.select_best == "eval_loss" and not has_validation:
        raise UserError("evaluation.select_best=eval_loss needs a validation split (evaluation.validation)")
    return settings.select_best


def trainer_eval_args(settings: EvaluationSettings, has_validation: bool, save_steps: int) -> dict[str, Any]:
    """eval_strategy, eval_steps and best-checkpoint fields for TRL's config."""
    if settings.every_steps == 0 or not (has_validation or settings.tasks):
        return {"eval_strategy": "no"}
    args: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": settings.every_steps,
                            "per_device_eval_batch_size": settings.batch_size, "prediction_loss_only": True}
    metric = selection_metric(settings, has_validation)
    if metric:
        if save_steps % settings.every_steps:
            raise UserError(f"training.save_steps={save_steps} must be a multiple of evaluation.every_steps="
                            f"{settings.every_steps} to keep the best checkpoint (each evaluated step needs its checkpoint)")
        args.update(load_best_model_at_end=True, metric_for_best_model=metric if metric == "eval_loss" else f"eval_{metric}",
                    greater_is_better=metric == "rlm_score")
    return args


def check_rlm_eval_possible(settings: EvaluationSettings, through_server: bool = False) -> None:
    """Held-out episodes generate with the main process's full copy of the model: not under FSDP,
    where each process holds a shard (unless they generate through a server: `through_server`).
    Checked before any model loads."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if settings.tasks and settings.every_steps and fsdp and not through_server:
        raise UserError("evaluation.tasks (held-out RLM episodes) cannot run under FSDP, where no process holds the "
                        "whole model; evaluate the saved model with `rlm-train eval` instead, or use validation loss")
    for path in settings.tasks:
        if not Path(path).expanduser().is_file():
            raise UserError(f"evaluation.tasks: {path} not found; make held-out tasks with `rlm-train tasks make`")


# ---------------------------------------------------------------------------
# Held-out RLM episodes


def held_out_episodes(settings: EvaluationSettings) -> int:
    """Episodes one evaluation runs: tasks in the held-out files x samples (0 when evaluation is off). A file
    not written yet counts none (a dry run before the stage that makes it; a real run refuses it first)."""
    if not (settings.tasks and settings.every_steps):
        return 0
    files = [Path(path).expanduser() for path in settings.tasks]
    tasks = sum(1 for file in files if file.is_file() for line in file.read_text().splitlines() if line.strip())
    return tasks * settings.samples


def evaluate_and_score(trainer: Any, metrics: dict[str, float], settings: EvaluationSettings,
                       out: Path, model_name: str, root: Any = None, concurrency: int = 1) -> dict[str, float]:
    """After the validation loss: run the held-out episodes on the main process (the others wait),
    give every process the scores, log them (eval_rlm_score, eval_rlm_score/FAMILY) and return
    `metrics` with them added, which is what the best-checkpoint selection reads. `root` is the root
    policy (default: the trainer's model through HF generate, one episode at a time); GRPO passes one
    over its generation backend, with `concurrency` episodes at once."""
    if not settings.tasks:
        return metrics
    scores: dict[str, float] | None = None
    if is_main_process():
        scores = run_rlm_eval(trainer.model, trainer.processing_class, settings,
                              out / "eval" / f"step-{trainer.state.global_step}", model_name, root, concurrency)
    scores = broadcast_from_main(scores)
    assert scores is not None
    logged = {f"eval_{key}": value for key, value in scores.items()}
    trainer.log(logged)
    return {**metrics, **logged}


def run_rlm_eval(model: Any, tokenizer: Any, settings: EvaluationSettings, eval_dir: Path,
                 model_name: str, root: Any = None, concurrency: int = 1) -> dict[str, float]:
    """Held-out episodes with `model` (or the ready policy `root`) as the root policy, through `run_eval`
    (resumable per step directory); returns {'rlm_score': mean, 'rlm_score/FAMILY': mean, ...}."""
    from rlm_train.eval.config import BootstrapConfig, EvalConfig, MethodConfig
    from rlm_train.eval.run import run_eval
    from rlm_train.policies.spec import build_policy

    config = EvalConfig(
        tasks=list(settings.tasks), out=str(eval_dir),
        methods=[MethodConfig(name=RLM_METHOD, policy=f"hf:{model_name}",
                              sub_policy=None if settings.sub_policy == "same" else settings.sub_policy,
                              sub_base_urls=settings.sub_base_urls)],
        samples=settings.samples, concurrency=concurrency, progress=False, rlm=settings.rlm,
        bootstrap=BootstrapConfig(resamples=100),
    )
    was_training = model.training
    model.eval()
    try:
        root = root or LiveModelPolicy(model, tokenizer, f"hf:{model_name}")
        sub = root if settings.sub_policy == "same" else build_policy(settings.sub_policy, settings.sub_base_urls)
        report = run_eval(config, policies={RLM_METHOD: (root, sub)})
    finally:
        model.train(was_training)
    score = report["methods"][RLM_METHOD]["score"]
    result = {"rlm_score": float(score["all"]["mean"] or 0.0)}
    result.update({f"rlm_score/{family}": float(v["mean"] or 0.0) for family, v in score["by_family"].items()})
    return result


def LiveModelPolicy(model: Any, tokenizer: Any, name: str) -> Any:
    """An HFPolicy answering with the trainer's own model (no second copy loaded), on its device."""
    import threading

    from rlm_train.models.hf import HFPolicy
    from rlm_train.models.loading import end_of_turn_ids

    policy = HFPolicy.__new__(HFPolicy)
    policy.path, policy.adapter, policy.name = name, None, name
    policy.model, policy.tokenizer = _OnModelDevice(model), tokenizer
    policy.stop_ids = end_of_turn_ids(tokenizer)
    policy._lock = threading.Lock()
    return policy


class _OnModelDevice:
    """`generate` with the inputs moved to the model's device and the KV cache on (training turns it off)."""

    def __init__(self, model: Any):
        self.model = model

    def generate(self, input_ids: Any, attention_mask: Any, **kwargs: Any) -> Any:
        device = next(self.model.parameters()).device
        out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  use_cache=True, **kwargs)
        return out.cpu()


# ---------------------------------------------------------------------------
# Metric sinks


def tracking_args(settings: Tracked, output_dir: str) -> dict[str, Any]:
    """report_to / run_name for TRL's config: `report_to` plus wandb when a W&B project is set (each one
    installed: `rollouts.tracking.check_tracking` refused the others when the config was checked)."""
    return {"report_to": wanted_sinks(settings) or "none", "run_name": settings.run_name or Path(output_dir).name}


def set_tracking_environment(settings: Tracked, output_dir: str) -> None:
    """What TRL's reporting callbacks read from the environment when the trainer is built: the W&B project,
    and TensorBoard's event directory (OUTPUT_DIR/tensorboard)."""
    if settings.wandb_project:
        os.environ["WANDB_PROJECT"] = settings.wandb_project
    if "tensorboard" in wanted_sinks(settings):
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(output_dir) / TENSORBOARD_DIR)
