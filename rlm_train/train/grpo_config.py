"""`rlm-train grpo` config: the recipe's sections (training, rollout, rlm, reward) and the checks across them."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from rlm_train.config import StrictModel, bounded, inherited
from rlm_train.errors import UserError
from rlm_train.policies.spec import ClientOptions
from rlm_train.rlm import RLMConfig
from rlm_train.train.common import OptimizerLoopSettings
from rlm_train.train.run_config import TrainingRunConfig


class GRPOTrainingSettings(OptimizerLoopSettings):
    config_aliases: ClassVar[dict[str, str]] = {**OptimizerLoopSettings.config_aliases, "shuffle_dataset": "shuffle"}

    max_steps: int = Field(100, ge=1)
    """Optimizer steps to run."""
    num_generations: int = bounded(8, ge=2, le=1024, why="a group's episodes are all held until the group is scored")
    """Episodes per prompt (the GRPO group); advantages compare episodes of the same prompt."""
    batch_size: int = Field(8, ge=1)
    """Episodes per device per micro-batch; batch_size x accumulation x processes must divide by num_generations."""
    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate (RL wants small steps: ~1e-5 for LoRA, ~1e-6 for full fine-tuning)."""
    lr_scheduler: str = "constant"
    """transformers scheduler name: constant, linear, cosine, ..."""
    beta: float = Field(0.0, ge=0)
    """KL coefficient against the reference model; 0 loads no reference model."""
    epsilon: float = Field(0.2, gt=0)
    """PPO clipping range of the importance ratio (its lower side; the upper too unless epsilon_high is set)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clipping range (TRL's epsilon_high; DAPO's clip-higher uses 0.28): a wider upper side lets rare tokens
    of good episodes gain probability, which keeps exploring. None: the same as epsilon."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer passes over each generated batch (GRPO's mu)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Token loss aggregation (TRL's loss_type); dapo normalizes by trained tokens in the accumulated batch."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: by the group's reward std, the batch's, or none (Dr. GRPO)."""
    drop_zero_advantage_groups: bool = True
    """Leave groups whose every advantage is 0 (all episodes got the same reward, or at most one was scored) out of
    the loss AND out of its token normaliser, so they do not dilute the groups that carry signal (loss_type dapo and
    bnpo count trained tokens; grpo and dr_grpo average over episodes, where dropped ones still count). Logged per
    step as rlm/dropped_groups and rlm/dropped_episodes, beside TRL's frac_reward_zero_std."""
    ddp_timeout: int | None = Field(None, ge=1)
    """Seconds a rank waits at a collective before the job aborts (TrainingArguments.ddp_timeout). Ranks wait on
    each other's episodes, so it must be at least 2 x the hard episode cap times the waves of episodes a rank runs
    per step; a smaller value is refused. None: derived from those (and from held-out evaluation), at least 1800."""

    @model_validator(mode="after")
    def _groups_fit(self) -> "GRPOTrainingSettings":
        if (self.batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(
                f"batch_size x gradient_accumulation_steps ({self.batch_size} x {self.gradient_accumulation_steps}) "
                f"must be a multiple of num_generations ({self.num_generations}): each step trains whole groups"
            )
        return self


class RolloutSettings(StrictModel):
    backend: Literal["transformers", "vllm_server"] = "transformers"
    """Who generates the root turns: 'transformers' (the trainer's model in-process; CPU or one GPU) or
    'vllm_server' (a `vllm serve` process in TRL's server mode; weights pushed after every step)."""
    vllm_server_url: str = "http://127.0.0.1:8000"
    """Base URL of the vLLM server (backend vllm_server)."""
    vllm_server_timeout_s: float = Field(240.0, gt=0)
    """How long to wait for the vLLM server to come up."""
    vllm_gpus: int = Field(1, ge=1)
    """GPUs the vLLM server uses (for its launch command: data-parallel replicas)."""
    vllm_importance_sampling_correction: bool = True
    """Weight each sampled token's loss by p_trainer / p_sampler, correcting for the sampler (the vLLM server, or
    in-process generate) scoring tokens differently from the trainer (TRL's names; applied by rlm-train for both
    backends, whenever the backend reports sampling logprobs). Ratios logged per step as
    sampling/importance_sampling_ratio/{min,mean,max} (after the bounds) and .../bounded_frac."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "token_truncate")
    """How the importance weight is formed and bounded (TRL's names): per token (token_*) or one ratio per episode,
    the product over all its tokens (sequence_*, which over thousands of tokens masks or reweights whole episodes for
    a few mismatched tokens); clipped into [min, max] (*_truncate) or set to 0 outside it (*_mask)."""
    vllm_importance_sampling_clip_min: float | None = Field(None, ge=0)
    """Lower bound of the importance weight (None: no lower bound)."""
    vllm_importance_sampling_clip_max: float | None = Field(3.0, gt=0)
    """Upper bound of the importance weight (None: no upper bound; at least one bound is needed)."""
    episode_timeout_s: float | None = Field(None, gt=0)
    """Hard wall-clock cap on one episode, counting time spent waiting on the model server; reaching it is
    infrastructure (the episode is masked, never penalized). None: 3 x rlm.max_wall_s."""
    max_completion_tokens: int | None = bounded(None, ge=16, le=1_000_000,
                                                why="an episode's tokens are all held for its loss; 1M is beyond any model's window")
    """Cap on all tokens after the first prompt (root turns + REPL feedback). A turn is cut to fit; the episode
    then ends over-long. It may not be below what the turn budget allows (`turn_budget_tokens`: the rlm section's
    turns, their REPL feedback and the answer-now turn), so episodes end by their turn budget, with a chance to
    answer, rather than cut mid-turn. None: exactly that budget."""
    concurrency: int = bounded(64, ge=1, le=200,
                              why="each episode in flight holds a REPL sandbox and one process holds at most 256, the fork-server's "
                                      "spares among them")
    """Episodes run at once (root turns of concurrent episodes are batched into one generate call)."""
    batch_wait_s: float = Field(0.02, ge=0)
    """How long a generate request waits for others to join its batch."""
    sub_policy: str = "same"
    """Model behind llm_query inside episodes: 'same' (the model being trained, not trained on these calls), or a
    policy spec: scripted | oracle | openai:MODEL (with sub_base_urls)."""
    sub_base_urls: list[str] = []
    """Servers for an openai: sub_policy."""
    client: ClientOptions = Field(default_factory=ClientOptions)
    """How an openai: sub_policy talks to its servers."""
    save_trajectories: bool = True
    """Append every episode (with its rewards) to output_dir/rollouts.jsonl."""


class RewardSettings(StrictModel):
    task_weight: float = Field(1.0, ge=0)
    """Weight of the task scorer's reward (0..1 from rlm_train.tasks.score on the FINAL answer)."""
    format_weight: float = Field(0.0, ge=0)
    """Weight of the format reward: half for root turns with a ```repl block, half for ending with FINAL. 0 turns it off."""

    overlong: Literal["mask", "penalty"] = "mask"
    """What happens to an over-long episode, however it was cut (between turns or mid-turn by
    rollout.max_completion_tokens, or by an episode budget: rlm.max_wall_s of the policy's own time, sub-calls,
    tokens): 'mask' leaves it out of the loss and of its group's reward statistics; 'penalty' trains on it with
    reward -overlong_penalty (plus whatever else it earned)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """overlong=penalty: the reward subtracted from an over-long episode."""
    overlong_buffer_tokens: int = Field(0, ge=0)
    """overlong=penalty: episodes within this many tokens of rollout.max_completion_tokens get a share of the
    penalty growing linearly to the full penalty at the cap (a soft length penalty); 0 turns it off."""

    @model_validator(mode="after")
    def _learns_something(self) -> "RewardSettings":
        if self.task_weight == 0 and self.format_weight == 0:
            raise ValueError("task_weight and format_weight are both 0: nothing to learn from")
        return self


class GRPORLMConfig(RLMConfig):
    """The RLM loop settings for GRPO episodes: the same fields, with defaults for RL (sampled, short)."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature of the root model; must be > 0 so the episodes of a group differ."""
    max_iterations: int = inherited(RLMConfig, "max_iterations", 4)
    """Root turns with code before the model is told to answer now (one extra, final turn)."""
    root_max_tokens: int = inherited(RLMConfig, "root_max_tokens", 512)
    """Max new tokens per root turn."""
    max_wall_s: float | None = inherited(RLMConfig, "max_wall_s", 300.0)
    """Wall-clock seconds of the episode's own time (not counting time waiting on the model server); past it
    the episode is over-long (reward.overlong). None = unlimited."""

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0: with greedy decoding every episode of a group is the same, "
                             "so every GRPO advantage is 0 (use e.g. rlm.temperature=1.0)")
        return value


class GRPOConfig(TrainingRunConfig):
    """`rlm-train grpo` config: one recipe YAML plus KEY=VALUE overrides (the shared run fields in TrainingRunConfig)."""

    config_aliases: ClassVar[dict[str, str]] = {
        **TrainingRunConfig.config_aliases,
        **{name: f"training.{name}" for name in ("num_generations", "beta", "epsilon", "epsilon_high",
                                                 "num_iterations", "loss_type", "scale_rewards", "ddp_timeout")},
        "shuffle_dataset": "training.shuffle",
        "max_completion_length": "rollout.max_completion_tokens",
        "temperature": "rlm.temperature",
        "vllm_server_base_url": "rollout.vllm_server_url",
        "vllm_server_timeout": "rollout.vllm_server_timeout_s",
        **{f"vllm_importance_sampling_{name}": f"rollout.vllm_importance_sampling_{name}"
           for name in ("correction", "mode", "clip_min", "clip_max")},
    }

    adapter: str | None = None
    """Start from this LoRA adapter (e.g. the SFT adapter) instead of a fresh one; needs lora.enabled."""
    prompts: str
    """RL prompt set: a task JSONL (rlm-train/task/v1) or the RL dataset from `rlm-train filter` (directory or JSONL)."""
    training: GRPOTrainingSettings = GRPOTrainingSettings()
    """GRPO optimizer, group size and loss settings."""
    rollout: RolloutSettings = RolloutSettings()
    """How episodes are generated."""
    rlm: GRPORLMConfig = GRPORLMConfig()
    """The RLM loop settings of every episode (turns, budgets, sandbox limits, sampling temperature)."""
    reward: RewardSettings = RewardSettings()
    """Reward weights."""


def turn_budget_tokens(rlm: RLMConfig) -> int:
    """Tokens an episode may add after its first prompt within its turn budget: every root turn at
    rlm.root_max_tokens with REPL feedback at rlm.feedback_chars, then the answer-now turn. It is the root
    conversation `rlm.window` sizes server windows with, less the first prompt (system prompt and query)."""
    from rlm_train.rlm import prompts
    from rlm_train.rlm.window import CHARS_PER_TOKEN, QUERY_TOKENS, root_tokens

    system = math.ceil(len(prompts.system_prompt(rlm.prompt_style, "", rlm.sub_model_chars)) / CHARS_PER_TOKEN)
    return root_tokens(rlm) - system - QUERY_TOKENS


def completion_token_cap(cfg: GRPOConfig) -> int:
    """rollout.max_completion_tokens, or the turn budget when unset."""
    return cfg.rollout.max_completion_tokens or turn_budget_tokens(cfg.rlm)


def rollout_waves(cfg: GRPOConfig) -> int:
    """Rounds of episodes one rank runs per generation: its episodes (batch_size x gradient_accumulation_steps,
    TRL's generation batch) over rollout.concurrency."""
    t = cfg.training
    return math.ceil(t.batch_size * t.gradient_accumulation_steps / cfg.rollout.concurrency)


def min_ddp_timeout_s(cfg: GRPOConfig) -> float | None:
    """2 x the longest one rank's rollout may take (the hard episode cap x its waves); None when episodes
    have no hard cap (rollout.episode_timeout_s and rlm.max_wall_s both null)."""
    from rlm_train.train.grpo_episodes import episode_timeout_s

    cap = episode_timeout_s(cfg)
    return None if cap is None else 2 * cap * rollout_waves(cfg)


def ddp_timeout_s(cfg: GRPOConfig, eval_episodes: int = 0) -> int:
    """training.ddp_timeout, or derived: at least 1800 (transformers' default), 2 x a rank's longest rollout,
    and 2 x the held-out evaluation the other ranks wait for (`eval_episodes` on the main process at
    rollout.concurrency, each within evaluation.rlm.max_wall_s)."""
    if cfg.training.ddp_timeout is not None:
        return cfg.training.ddp_timeout
    need = [1800.0, min_ddp_timeout_s(cfg) or 0.0]
    eval_cap = cfg.evaluation.rlm.max_wall_s
    if eval_episodes and eval_cap is not None:
        need.append(2 * eval_cap * math.ceil(eval_episodes / cfg.rollout.concurrency))
    return math.ceil(max(need))


def check_config(cfg: GRPOConfig, source: str) -> None:
    """Settings that contradict each other across sections (a UserError naming the keys and the fix)."""
    if cfg.adapter and not cfg.lora.enabled:
        raise UserError(f"{source}: adapter needs lora.enabled=true (it continues training that adapter)")
    r = cfg.rollout
    if r.vllm_importance_sampling_clip_min is None and r.vllm_importance_sampling_clip_max is None:
        raise UserError(f"{source}: rollout.vllm_importance_sampling_clip_min and _clip_max are both null; set at "
                        "least one bound (e.g. rollout.vllm_importance_sampling_clip_max=3.0)")
    if (r.vllm_importance_sampling_clip_min is not None and r.vllm_importance_sampling_clip_max is not None
            and r.vllm_importance_sampling_clip_min >= r.vllm_importance_sampling_clip_max):
        raise UserError(f"{source}: rollout.vllm_importance_sampling_clip_min ({r.vllm_importance_sampling_clip_min}) "
                        f"must be below rollout.vllm_importance_sampling_clip_max ({r.vllm_importance_sampling_clip_max})")
    if cfg.requires.gpus and cfg.launch.num_processes > cfg.requires.gpus:
        raise UserError(f"{source}: launch.num_processes={cfg.launch.num_processes} training processes but "
                        f"requires.gpus={cfg.requires.gpus}: one process per GPU; lower launch.num_processes")
    budget = turn_budget_tokens(cfg.rlm)
    if r.max_completion_tokens is not None and r.max_completion_tokens < budget:
        rlm = cfg.rlm
        raise UserError(
            f"{source}: rollout.max_completion_tokens={r.max_completion_tokens} is below the {budget} tokens the turn "
            f"budget allows (rlm.max_iterations={rlm.max_iterations} turns of rlm.root_max_tokens={rlm.root_max_tokens} "
            f"with rlm.feedback_chars={rlm.feedback_chars} of REPL output each, then the answer-now turn), so episodes "
            f"would be cut mid-turn and counted over-long; set it to at least {budget}, leave it unset, or lower the "
            "rlm budget")
    cap = completion_token_cap(cfg)
    if cfg.reward.overlong_buffer_tokens >= cap:
        raise UserError(f"{source}: reward.overlong_buffer_tokens ({cfg.reward.overlong_buffer_tokens}) must be below "
                        f"rollout.max_completion_tokens ({cap})")
    need = min_ddp_timeout_s(cfg)
    if cfg.training.ddp_timeout is not None and need is not None and cfg.training.ddp_timeout < need:
        from rlm_train.train.grpo_episodes import episode_timeout_s

        raise UserError(
            f"{source}: training.ddp_timeout={cfg.training.ddp_timeout}s is below {need:g}s = 2 x the hard episode cap "
            f"of {episode_timeout_s(cfg):g}s (rollout.episode_timeout_s, else 3 x rlm.max_wall_s) x "
            f"{rollout_waves(cfg)} wave(s) of episodes per rank; a rank waiting on another's episodes would abort the "
            "job: raise it or leave it unset (derived)")
    if cfg.rollout.backend == "transformers" and cfg.launch.num_processes > 1:
        raise UserError(
            f"{source}: rollout.backend=transformers generates in-process and cannot run with "
            f"launch.num_processes={cfg.launch.num_processes} (episodes of different lengths would deadlock "
            "sharded generation); use rollout.backend=vllm_server"
        )
