"""GRPO with full RLM episodes as rollouts (TRL `GRPOTrainer` + PEFT): the plan, TRL's config and `run_grpo`.

Each completion TRL asks for is one whole RLM episode in the sandbox whose root model is the policy
being trained; REPL output is masked out of the loss. The pieces, one module each:

    grpo_config     the recipe's config and the checks across its sections
    grpo_trainer    TRL's GRPOTrainer subclass: zero-advantage groups, importance weights, held-out evaluation
    rl_prompts      (rlm_train.rollouts) the prompt set: a task file or the RL set from `rlm-train filter`
    grpo_backends   token generation: in-process transformers (CPU) or a vLLM server (GPUs)
    grpo_rollout    the episode recorder and TRL's rollout_func
    grpo_episodes   how an episode counts (ok / over-long / infrastructure), the rollout log
    grpo_setup      stop tokens, the template check, LoRA dropout, resuming
    grpo_curve      the reward curve: rewards.csv and reward.png in output_dir, one row per step
    grpo_weight_sync  ordered, checked weight pushes to a vLLM server from several ranks
    rewards         task scorer, format and over-long rewards
    runtime         what SFT and GRPO runs share (resources, output dir, metrics, saving)
    run_config      the run fields SFT and GRPO configs share, TRL's names for them, the dry run's checks
    trl_compat      every reach past TRL's public API, written for one TRL version
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

# load_context only for tests/test_pipeline_data.py, which imports it from here (not ours to edit).
from rlm_train.rollouts.rl_prompts import load_context, load_prompt_set, sft_overlap  # noqa: F401
from rlm_train.train import trl_compat
from rlm_train.train.common import is_main_process, leaves_process_group, lora_config, main_print
from rlm_train.train.grpo_backends import BatchingGenerator, default_backend_factory, one_backend
from rlm_train.train.grpo_curve import write_reward_curve
from rlm_train.train.grpo_config import GRPOConfig, check_config, completion_token_cap, ddp_timeout_s
from rlm_train.train.grpo_episodes import RolloutLog
from rlm_train.train.grpo_rollout import GeneratorPolicy, make_rollout_func, sub_policy_factory
from rlm_train.train.grpo_trainer import make_trainer_class
from rlm_train.train.grpo_setup import (  # noqa: F401 - check_template_extends is part of this module's API
    apply_stop_ids,
    check_template_extends,
    check_trainer_stop_ids,
    checkpoint_step,
    find_resume,
    lora_dropout_off,
    stop_token_ids,
    trim_logs_for_resume,
)
from rlm_train.train.evaluation import (
    check_rlm_eval_possible,
    held_out_episodes,
    set_tracking_environment,
    tracking_args,
    trainer_eval_args,
)
from rlm_train.train.interrupt import GracefulStop
from rlm_train.train.rewards import load_task_scorer, make_reward_funcs
from rlm_train.train.run_config import check_run_config, trl_arguments_errors
from rlm_train.train.runtime import (
    FinalWeights,
    Problem,
    plan_footer,
    cuda_count,
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

SHOWN = ("loss", "reward", "reward_std", "frac_reward_zero_std", "rlm/dropped_groups", "rlm/overlong_frac",
         "sampling/importance_sampling_ratio/mean", "completions/mean_length", "learning_rate")


def resource_problems(cfg: GRPOConfig) -> list[Problem]:
    """What this machine lacks for the recipe (empty: runnable here)."""
    problems = hardware_problems(cfg.requires, cfg.device, cfg.dtype == "bfloat16" or cfg.amp_bf16,
                                 "recipes/tiny-cpu-grpo.yaml", "slurm/grpo.sbatch")
    if cfg.requires.vllm or cfg.rollout.backend == "vllm_server":
        problems += missing_package(
            "vllm", f"{'rollout.backend=vllm_server' if cfg.rollout.backend == 'vllm_server' else 'requires.vllm=true'} "
                    "needs the vllm package in the training environment (TRL's server "
                    "mode imports it to push weights); install the gpu extra into this environment (pip install -e "
                    "'.[gpu]' -c constraints/gpu.txt; the GPU jobs run it too), or set rollout.backend=transformers"
        )
    if cfg.rollout.backend == "vllm_server" and cuda_count() == 0:
        problems.append(Problem(
            "rollout.backend=vllm_server pushes weights to the server over NCCL, which needs CUDA GPUs "
            "(this machine has none); on CPU use rollout.backend=transformers"
        ))
    return problems


def vllm_serve_command(cfg: GRPOConfig) -> str:
    """The `vllm serve` line for backend vllm_server, with the flags TRL's server mode needs.

    TRL's server mode needs VLLM_SERVER_DEV_MODE=1, whose routes replace the weights and run code
    on vLLM's workers, and vLLM's --api-key does not guard them. So the server binds 127.0.0.1
    when the trainer reaches it there (rollout.vllm_server_url on loopback: slurm.vllm_nodes=0);
    one that serves other nodes binds every interface and answers only requests carrying the
    job's token (rlm_train/serve/vllm_auth.py: $RLM_TRAIN_VLLM_TOKEN_FILE; slurm/grpo.sbatch
    makes one per job). Its window is refused when longer than the model's positions."""
    from urllib.parse import urlparse

    from rlm_train.errors import UserError
    from rlm_train.serve.vllm_window import model_positions
    from rlm_train.serve.vllm_auth import MIDDLEWARE

    url = urlparse(cfg.rollout.vllm_server_url)
    local = url.hostname in ("127.0.0.1", "localhost", "::1")
    window = _max_model_len(cfg)
    positions = model_positions(cfg.model, [])
    if positions is not None and window > positions:
        raise UserError(f"rollout: the vLLM server needs a {window}-token window (rlm budgets, rollout.max_completion_tokens; "
                        f"rlm_train/rlm/window.py) but {cfg.model} holds {positions} positions (its config.json); lower "
                        f"rlm.max_iterations / root_max_tokens / sub_model_chars or rollout.max_completion_tokens")
    parts = [
        "env", "VLLM_SERVER_DEV_MODE=1", "vllm", "serve", cfg.model,
        "--host", "127.0.0.1" if local else "0.0.0.0", "--port", str(url.port or 8000),
        *([] if local else ["--middleware", MIDDLEWARE]),
        "--data-parallel-size", str(cfg.rollout.vllm_gpus),
        "--dtype", "bfloat16",
        "--max-model-len", str(window),
        "--weight-transfer-config", "'{\"backend\": \"nccl\"}'",
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
    ]
    # No --enable-lora: TRL merges the adapter before pushing weights, so the server holds plain weights.
    return " ".join(parts)


def _evaluation_line(cfg: GRPOConfig) -> str:
    e = cfg.evaluation
    if not (e.every_steps and e.tasks):
        return "none (evaluation.every_steps and evaluation.tasks unset)"
    keep = "keeps the best-scoring checkpoint as adapter/" if e.select_best != "none" else "keeps the last weights"
    how = (f"generated like the rollouts ({cfg.rollout.backend}), {cfg.rollout.concurrency} at once on the main "
           "process" + (" after a weight push" if cfg.rollout.backend == "vllm_server" else ""))
    return (f"every {e.every_steps} steps: {e.samples} episode(s) per task of {', '.join(e.tasks)}, {how}; score per "
            f"family logged; {keep}")


def _signal_line(cfg: GRPOConfig) -> str:
    t, r = cfg.training, cfg.rollout
    groups = ("zero-advantage groups left out of the loss and its normaliser" if t.drop_zero_advantage_groups
              else "zero-advantage groups kept (they dilute the token normaliser)")
    bounds = f"[{r.vllm_importance_sampling_clip_min or 0:g}, {r.vllm_importance_sampling_clip_max or math.inf:g}]"
    weights = (f"importance weights {r.vllm_importance_sampling_mode} {bounds} from the sampler's logprobs"
               if r.vllm_importance_sampling_correction else "no importance weights")
    clip = f"{t.epsilon:g}" + (f"/{t.epsilon_high:g}" if t.epsilon_high is not None else "")
    timeout = (f"{t.ddp_timeout}s" if t.ddp_timeout is not None
               else f"{ddp_timeout_s(cfg)}s (derived{', more with held-out evaluation' if cfg.evaluation.tasks else ''})")
    return f"{groups}; {weights}; clip {clip}; ddp_timeout {timeout}"


def _overlong_line(cfg: GRPOConfig) -> str:
    r = cfg.reward
    what = ("masked: left out of the loss and of the group's statistics" if r.overlong == "mask"
            else f"trained with reward -{r.overlong_penalty:g}"
            + (f", a share of it within {r.overlong_buffer_tokens} tokens of the cap" if r.overlong_buffer_tokens else ""))
    return (f"{what} (cut at {completion_token_cap(cfg)} tokens, by a budget, or past "
            f"{cfg.rlm.max_wall_s}s of its own time; time waiting on the server never counts)")


def _max_model_len(cfg: GRPOConfig) -> int:
    """The server's window: an episode's completion after its first prompt (system + query,
    ~2k tokens), and every request the RLM config lets an episode send (its longest
    sub-call included), so no ordinary llm_query is refused for its length."""
    from rlm_train.rlm.window import server_window_tokens

    return max(completion_token_cap(cfg) + 2048, server_window_tokens(cfg.rlm))


def plan(cfg: GRPOConfig, source: str) -> str:
    """Human-readable plan: what would run, where outputs go, and what this machine lacks."""
    from rlm_train.models.loading import model_plan_note

    def here(p: str) -> str:
        return "" if Path(p).expanduser().exists() else "  (not found on this machine: a real run stops here)"

    model_note = model_plan_note(cfg.model)
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
        f"max_completion_tokens {completion_token_cap(cfg)}"
        f"{'' if r.max_completion_tokens else ' (the turn budget)'}, concurrency {r.concurrency}",
        f"  generation   {gen}",
        f"  sub-calls    {sub}",
        f"  reward       {cfg.reward.task_weight:g} x task scorer"
        + (f" + {cfg.reward.format_weight:g} x repl format" if cfg.reward.format_weight else "")
        + "; REPL output tokens masked out of the loss",
        f"  over-long    {_overlong_line(cfg)}",
        f"  signal       {_signal_line(cfg)}",
        f"  compute      device={cfg.device} dtype={cfg.dtype} threads={cfg.num_threads or 'default'} "
        f"grad_ckpt={t.gradient_checkpointing}",
        f"  outputs      {cfg.output_dir}/ (checkpoint-N/, {'adapter/' if cfg.lora.enabled else 'model/'}, "
        f"rollouts.jsonl, metrics.jsonl, grpo_config.json{', merged/' if cfg.save_merged else ''})",
        f"  resume       {cfg.resume}",
        f"  evaluation   {_evaluation_line(cfg)}",
    ]
    if r.backend == "vllm_server":
        lines.append(f"  vllm server  {vllm_serve_command(cfg)}")
    lines += plan_footer(cfg.launch, "grpo", source, resource_problems(cfg))
    return "\n".join(lines)


def check_training_arguments(cfg: GRPOConfig, source: str) -> None:
    """The dry run's check of what TRL would refuse on the GPU node (run_config.check_run_config)."""
    _, weights = make_reward_funcs(cfg, {}, load_task_scorer, RolloutLog(None))
    check_run_config(cfg, source, lambda: build_trl_args(cfg, "cpu", weights))


def build_trl_args(cfg: GRPOConfig, device: str, reward_weights: list[float]) -> Any:
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
        epsilon_high=t.epsilon_high,
        num_iterations=t.num_iterations,
        loss_type=t.loss_type,
        scale_rewards=t.scale_rewards,
        mask_truncated_completions=False,  # reward.overlong decides, through env_mask and the rewards
        reward_weights=reward_weights,
        temperature=cfg.rlm.temperature,  # per-token logprobs are taken at the sampling temperature
        max_completion_length=completion_token_cap(cfg),
        use_vllm=vllm,
        vllm_mode="server",
        vllm_server_base_url=r.vllm_server_url if vllm else None,
        vllm_server_timeout=r.vllm_server_timeout_s,
        # Ours applies rollout.vllm_importance_sampling_* to every backend (shape_the_loss); TRL's would
        # only correct generations it made itself, and never the in-process ones.
        vllm_importance_sampling_correction=False,
        ddp_timeout=ddp_timeout_s(cfg, held_out_episodes(cfg.evaluation)),
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=device == "cuda" and (cfg.dtype == "bfloat16" or cfg.amp_bf16),
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        shuffle_dataset=t.shuffle,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        **tracking_args(cfg, cfg.output_dir),
        **{**trainer_eval_args(cfg.evaluation, False, t.save_steps),
           "per_device_eval_batch_size": t.batch_size},  # TRL checks it divides into groups; our evaluate ignores it
        disable_tqdm=True,
        remove_unused_columns=False,  # task_id rides along to rollout_func and the rewards
        log_completions=False,
        dataloader_num_workers=0,
    )


@leaves_process_group
def run_grpo(cfg: GRPOConfig, source: str = "config", *, scorer: Callable | None = None,
             backend_factory: Callable[[Any], Any] | None = None,
             on_batch: Callable[[dict, dict], None] | None = None,
             on_trainer: Callable[[Any], None] | None = None) -> dict:
    """Train; returns a summary. `scorer`, `backend_factory`, `on_batch`, `on_trainer` are for tests
    (a scripted generator, capturing TRL's batch, snapshotting weights). With several processes, only the
    main one writes (logs, metrics, rollouts, adapter, merged model, summary)."""
    check_config(cfg, source)
    check_run_config(cfg, source)
    device = start_run(resource_problems(cfg), cfg.num_threads, cfg.device, source, "grpo")
    trl_compat.silence_rollout_func_notice()
    from rlm_train.models.loading import check_adapter, load_causal_lm, load_peft_adapter, load_tokenizer, resolve_model

    # Everything that can be wrong with the inputs fails here, before any weights load.
    scorer = scorer or load_task_scorer()
    make_sub = sub_policy_factory(cfg)
    model_path = resolve_model(cfg.model)
    if cfg.adapter:
        check_adapter(cfg.adapter, model_path)
    check_rlm_eval_possible(cfg.evaluation, through_server=cfg.rollout.backend == "vllm_server")
    resume_from = find_resume(cfg, source)
    prompt_set = load_prompt_set(cfg.prompts, cfg.rlm)
    for warning in sft_overlap(prompt_set, cfg.model, cfg.adapter):
        main_print(f"[grpo] warning: {warning}")
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    check_template_extends(tokenizer)
    stop_ids = stop_token_ids(tokenizer, model_path)
    main_print(f"[grpo] {len(prompt_set.rows)} prompts over {len(prompt_set.tasks)} tasks from {prompt_set.source}; "
               f"turns end at {tokenizer.convert_ids_to_tokens(stop_ids)}")

    out = prepare_output_dir(cfg, "grpo")
    log = RolloutLog(out / "rollouts.jsonl" if cfg.rollout.save_trajectories else None)
    start_step = checkpoint_step(resume_from) if resume_from else 0
    dropped = trim_logs_for_resume(out, start_step, log)
    if resume_from:
        main_print(f"[grpo] resuming from {resume_from} at step {start_step}; dropped {dropped.get('rollouts', 0)} "
                   f"rollout and {dropped.get('metrics', 0)} metric records of the steps to be trained again")

    from datasets import Dataset

    model = load_causal_lm(model_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
    apply_stop_ids(model, stop_ids)
    peft_config = None
    if cfg.adapter:
        model = load_peft_adapter(model, cfg.adapter, model_path, is_trainable=True)
    elif cfg.lora.enabled:
        peft_config = lora_config(cfg.lora.model_copy(update={"dropout": 0.0}))
    if cfg.lora.enabled and (lora_dropout_off(model) or cfg.lora.dropout):
        main_print("[grpo] LoRA dropout set to 0: the policy ratio compares two passes over the same tokens")
    reward_funcs, weights = make_reward_funcs(cfg, prompt_set.tasks, scorer, log)
    backend = one_backend(backend_factory or default_backend_factory(cfg, tokenizer, stop_ids))
    rollout = make_rollout_func(cfg, tokenizer, prompt_set, backend, log, stop_ids, make_sub)

    def eval_root(trainer: Any) -> Any:  # held-out episodes generated as the rollouts are
        return GeneratorPolicy(BatchingGenerator(backend(trainer), cfg.rollout.batch_wait_s), tokenizer, f"hf:{cfg.model}")

    set_tracking_environment(cfg, cfg.output_dir)
    with trl_arguments_errors(source):
        trl_args = build_trl_args(cfg, device, weights)
    trainer = make_trainer_class(on_batch, log, cfg, eval_root)(
        model=model,
        reward_funcs=reward_funcs,
        args=trl_args,
        train_dataset=Dataset.from_list(prompt_set.rows),
        eval_dataset=Dataset.from_list(prompt_set.rows) if cfg.evaluation.every_steps else None,  # unused: see evaluate
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=rollout,
        callbacks=[make_metrics_callback(out / "metrics.jsonl", "grpo", SHOWN)],
    )
    log.bind(trainer.accelerator)
    check_trainer_stop_ids(trainer, stop_ids)
    lora_dropout_off(trainer.model)
    if (generation := trl_compat.server_generation(trainer)) is not None:
        trl_compat.install_ordered_weight_sync(generation, trainer.accelerator)
    weights = FinalWeights(out, tokenizer, cfg.lora.enabled, model_path, cfg.chat_template, "grpo")
    with GracefulStop("grpo") as stop:
        trainer.add_callback(stop.callback())
        run = train_until_stopped(trainer, stop, weights, on_trainer,
                                  resume_from_checkpoint=str(resume_from) if resume_from else None)
    log.flush()
    curve = write_reward_curve(out) if is_main_process() else []
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"output_dir": str(out), "global_step": trainer.state.global_step,
               "train_loss": run.result.training_loss if run.result else None, "rewards": [h["reward"] for h in history],
               "resumed_from": str(resume_from) if resume_from else None,
               "stopped_by": stop.signal_name, "exit_code": stop.exit_code, "wall_s": run.wall_s,
               "reward_curve": [str(out / name) for name in curve]}
    if stop.signal_name:  # checkpointed, its weights exported as partial; merged/ is the finished run's to write
        main_print(f"[grpo] stopped by {stop.signal_name} at step {trainer.state.global_step}; "
                   "run the same command again to resume")
        return write_summary(out, {**summary, **run.partial})
    saved = save_trained(trainer, tokenizer, out, cfg.lora.enabled, model_path, cfg.chat_template)
    if cfg.save_merged:
        saved.update(save_merged(Path(saved["adapter_dir"]), model_path, out / "merged", cfg.merged_dtype,
                                 cfg.chat_template))
    return write_summary(out, {**summary, **saved})
