"""GRPO with full RLM episodes as rollouts (TRL `GRPOTrainer` + PEFT): the trainer wiring and `run_grpo`.

Each completion TRL asks for is one whole RLM episode in the sandbox whose root model is the policy
being trained; REPL output is masked out of the loss. The pieces, one module each:

    grpo_config     the recipe's config and the checks across its sections
    rl_prompts      (rlm_train.rollouts) the prompt set: a task file or the RL set from `rlm-train filter`
    grpo_backends   token generation: in-process transformers (CPU) or a vLLM server (GPUs)
    grpo_rollout    the episode recorder and TRL's rollout_func
    rewards         task scorer and format rewards
    runtime         what SFT and GRPO runs share (resources, output dir, metrics, saving)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from rlm_train.errors import UserError
# load_context only for tests/test_pipeline_data.py, which imports it from here (not ours to edit).
from rlm_train.rollouts.rl_prompts import load_context, load_prompt_set  # noqa: F401
from rlm_train.train.common import lora_config
from rlm_train.train.grpo_backends import default_backend_factory
from rlm_train.train.grpo_config import GRPOConfig, check_config
from rlm_train.train.grpo_rollout import RolloutLog, make_rollout_func, sub_policy_factory
from rlm_train.train.rewards import load_task_scorer, make_reward_funcs
from rlm_train.train.runtime import (
    Problem,
    plan_footer,
    cuda_count,
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

SHOWN = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "learning_rate")


def make_trainer_class(on_batch: Callable[[dict, dict], None] | None = None):
    """GRPOTrainer that keeps the batch rows for rollout_func (TRL hands it only the prompts, and the
    task each prompt belongs to lives in the other columns of the same rows)."""
    from trl import GRPOTrainer

    class RLMGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            self.rlm_batch_rows = inputs
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self.rlm_batch_rows = None
            if on_batch is not None:
                on_batch(output, {"inputs": inputs})
            return output

    return RLMGRPOTrainer


def resource_problems(cfg: GRPOConfig) -> list[Problem]:
    """What this machine lacks for the recipe (empty: runnable here)."""
    problems = hardware_problems(cfg.requires, cfg.device, cfg.dtype == "bfloat16",
                                 "recipes/tiny-cpu-grpo.yaml", "slurm/grpo.sbatch")
    if cfg.requires.vllm or cfg.rollout.backend == "vllm_server":
        problems += missing_package(
            "vllm", "rollout.backend=vllm_server needs the vllm package in the training environment (TRL's server "
                    "mode imports it to push weights); pip install vllm on the GPU node, or set rollout.backend=transformers"
        )
    if cfg.rollout.backend == "vllm_server" and cuda_count() == 0:
        problems.append(Problem(
            "rollout.backend=vllm_server pushes weights to the server over NCCL, which needs CUDA GPUs "
            "(this machine has none); on CPU use rollout.backend=transformers"
        ))
    return problems


def vllm_serve_command(cfg: GRPOConfig) -> str:
    """The `vllm serve` line for backend vllm_server, with the flags TRL's server mode needs."""
    from urllib.parse import urlparse

    url = urlparse(cfg.rollout.vllm_server_url)
    parts = [
        "env", "VLLM_SERVER_DEV_MODE=1", "vllm", "serve", cfg.model,
        "--host", "0.0.0.0", "--port", str(url.port or 8000),
        "--data-parallel-size", str(cfg.rollout.vllm_gpus),
        "--dtype", "bfloat16",
        "--max-model-len", str(_max_model_len(cfg)),
        "--weight-transfer-config", "'{\"backend\": \"nccl\"}'",
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
    ]
    # No --enable-lora: TRL merges the adapter before pushing weights, so the server holds plain weights.
    return " ".join(parts)


def _max_model_len(cfg: GRPOConfig) -> int:
    # first prompt (system + query, ~1k tokens) + everything after it
    return cfg.rollout.max_completion_tokens + 2048


def plan(cfg: GRPOConfig, source: str) -> str:
    """Human-readable plan: what would run, where outputs go, and what this machine lacks."""
    def here(p: str) -> str:
        return "" if Path(p).expanduser().exists() else "  (not found on this machine: a real run stops here)"

    model_note = "" if cfg.model == "gemma3-270m" else here(cfg.model)
    t, r = cfg.training, cfg.rollout
    mode = (f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} targets={cfg.lora.target_modules}"
            + (f" from {cfg.adapter}" if cfg.adapter else "")) if cfg.lora.enabled else "full fine-tuning"
    prompts_per_step = t.batch_size * t.gradient_accumulation_steps * cfg.launch.num_processes // t.num_generations
    sub = "the model being trained (not trained on)" if r.sub_policy == "same" else r.sub_policy
    gen = ("transformers in-process (the trainer's current weights)" if r.backend == "transformers"
           else f"vLLM server {r.vllm_server_url} (TRL server mode, weights pushed each step)")
    lines = [
        f"grpo plan ({source})",
        f"  model        {cfg.model}{model_note}",
        f"  prompts      {cfg.prompts}{here(cfg.prompts)}",
        f"  template     {cfg.chat_template}",
        f"  method       {mode}",
        f"  schedule     {t.max_steps} steps x {prompts_per_step} prompt(s) x {t.num_generations} episodes, "
        f"lr {t.learning_rate:g}, loss {t.loss_type}, beta {t.beta:g}, scale_rewards {t.scale_rewards}",
        f"  episodes     full RLM loop in the sandbox: max_iterations {cfg.rlm.max_iterations}, "
        f"temperature {cfg.rlm.temperature:g}, root_max_tokens {cfg.rlm.root_max_tokens}, "
        f"max_completion_tokens {r.max_completion_tokens}, concurrency {r.concurrency}",
        f"  generation   {gen}",
        f"  sub-calls    {sub}",
        f"  reward       {cfg.reward.task_weight:g} x task scorer"
        + (f" + {cfg.reward.format_weight:g} x repl format" if cfg.reward.format_weight else "")
        + "; REPL output tokens masked out of the loss",
        f"  compute      device={cfg.device} dtype={cfg.dtype} threads={cfg.num_threads or 'default'} "
        f"grad_ckpt={t.gradient_checkpointing}",
        f"  outputs      {cfg.output_dir}/ (checkpoint-N/, {'adapter/' if cfg.lora.enabled else 'model/'}, "
        "rollouts.jsonl, metrics.jsonl, grpo_config.json)",
    ]
    if r.backend == "vllm_server":
        lines.append(f"  vllm server  {vllm_serve_command(cfg)}")
    lines += plan_footer(cfg.launch, "grpo", source, resource_problems(cfg))
    return "\n".join(lines)


def build_trl_args(cfg: GRPOConfig, device: str, reward_weights: list[float], reporters: list[str]) -> Any:
    """TRL GRPOConfig from ours. Generation is ours (rollout_func); TRL's sampling knobs that also shape
    the loss (temperature) are set to match what the episodes used."""
    from trl import GRPOConfig as TRLGRPOConfig

    t, r = cfg.training, cfg.rollout
    vllm = r.backend == "vllm_server"
    return TRLGRPOConfig(
        output_dir=cfg.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        beta=t.beta,
        epsilon=t.epsilon,
        num_iterations=t.num_iterations,
        loss_type=t.loss_type,
        scale_rewards=t.scale_rewards,
        mask_truncated_completions=t.mask_truncated_completions,
        reward_weights=reward_weights,
        temperature=cfg.rlm.temperature,  # per-token logprobs are taken at the sampling temperature
        max_completion_length=r.max_completion_tokens,
        use_vllm=vllm,
        vllm_mode="server",
        vllm_server_base_url=r.vllm_server_url if vllm else None,
        vllm_server_timeout=r.vllm_server_timeout_s,
        vllm_importance_sampling_correction=r.vllm_importance_sampling_correction,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=cfg.dtype == "bfloat16" and device == "cuda",
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        shuffle_dataset=t.shuffle,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=reporters or "none",
        disable_tqdm=True,
        remove_unused_columns=False,  # task_id rides along to rollout_func and the rewards
        log_completions=False,
        dataloader_num_workers=0,
    )


def check_template_extends(tokenizer: Any) -> None:
    """The rollout builds turn k+1's prompt by extending turn k's; the template must render history verbatim."""
    from rlm_train.models.loading import render_chat

    first = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    reply = "\n```repl\nprint(1)\n```\n"  # sampled text may start or end with whitespace
    later = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "REPL output:\n1"}]
    a = render_chat(tokenizer, first, add_generation_prompt=True) + reply
    b = render_chat(tokenizer, later, add_generation_prompt=True)
    if not b.startswith(a):
        raise UserError(
            "the chat template does not render past assistant turns exactly as they were generated "
            "(e.g. it strips or rewrites them), so multi-turn episodes cannot be trained token-exactly; "
            "set chat_template to qwen3 or gemma3 (ours) or a .jinja file that keeps history verbatim"
        )


def run_grpo(cfg: GRPOConfig, source: str = "config", *, scorer: Callable | None = None,
             backend_factory: Callable[[Any], Any] | None = None,
             on_batch: Callable[[dict, dict], None] | None = None,
             on_trainer: Callable[[Any], None] | None = None) -> dict:
    """Train; returns a summary. `scorer`, `backend_factory`, `on_batch`, `on_trainer` are for tests
    (a scripted generator, capturing TRL's batch, snapshotting weights)."""
    check_config(cfg, source)
    device = start_run(resource_problems(cfg), cfg.num_threads, cfg.device, source, "grpo")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; we pin TRL
    from rlm_train.models.loading import load_causal_lm, load_peft_adapter, load_tokenizer, resolve_model

    scorer = scorer or load_task_scorer()
    make_sub = sub_policy_factory(cfg)
    model_path = resolve_model(cfg.model)
    prompt_set = load_prompt_set(cfg.prompts, cfg.rlm)  # before the model: bad data fails in seconds
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    check_template_extends(tokenizer)
    print(f"[grpo] {len(prompt_set.rows)} prompts over {len(prompt_set.tasks)} tasks from {prompt_set.source}", flush=True)

    out = prepare_output_dir(cfg, "grpo")
    log = RolloutLog(out / "rollouts.jsonl" if cfg.rollout.save_trajectories else None)

    from datasets import Dataset

    model = load_causal_lm(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    peft_config = None
    if cfg.adapter:
        model = load_peft_adapter(model, cfg.adapter, model_path, is_trainable=True)
    elif cfg.lora.enabled:
        peft_config = lora_config(cfg.lora)
    reward_funcs, weights = make_reward_funcs(cfg, prompt_set.tasks, scorer, log)
    rollout = make_rollout_func(cfg, tokenizer, prompt_set, backend_factory or default_backend_factory(cfg, tokenizer),
                                log, make_sub)
    trainer = make_trainer_class(on_batch)(
        model=model,
        reward_funcs=reward_funcs,
        args=build_trl_args(cfg, device, weights, installed_reporters(cfg.report_to, "grpo")),
        train_dataset=Dataset.from_list(prompt_set.rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=rollout,
        callbacks=[make_metrics_callback(out / "metrics.jsonl", "grpo", SHOWN)],
    )
    result, wall = train(trainer, on_trainer)
    log.flush()  # the last batch's episodes, now that their rewards are in
    saved = save_trained(trainer, tokenizer, out, cfg.lora.enabled, model_path, cfg.chat_template)
    history = [h for h in trainer.state.log_history if "reward" in h]
    return write_summary(out, {"output_dir": str(out), "global_step": trainer.state.global_step,
                               "train_loss": result.training_loss, "rewards": [h["reward"] for h in history],
                               "wall_s": wall, **saved})
