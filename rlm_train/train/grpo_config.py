"""`rlm-train grpo` config: the recipe's sections (training, rollout, rlm, reward) and the checks across them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlm_train.config import StrictModel
from rlm_train.errors import UserError
from rlm_train.policies.spec import ClientOptions
from rlm_train.rlm import RLMConfig
from rlm_train.train.common import LaunchSettings, LoraSettings, OptimizerLoopSettings, Requirements


class GRPOTrainingSettings(OptimizerLoopSettings):
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to run."""
    num_generations: int = Field(8, ge=2)
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
    """PPO clipping range of the importance ratio."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer passes over each generated batch (GRPO's mu)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Token loss aggregation (TRL's loss_type); dapo normalizes by trained tokens in the accumulated batch."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: by the group's reward std, the batch's, or none (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave episodes cut by rollout.max_completion_tokens mid-turn out of the loss."""

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
    """Correct for vLLM-vs-trainer logprob mismatch with a truncated importance weight (TRL)."""
    max_completion_tokens: int = Field(4096, ge=16)
    """Cap on all tokens after the first prompt (root turns + REPL feedback). A turn is cut to fit; the episode
    then ends with what it has (usually no answer, reward 0)."""
    concurrency: int = Field(64, ge=1)
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

    @model_validator(mode="after")
    def _learns_something(self) -> "RewardSettings":
        if self.task_weight == 0 and self.format_weight == 0:
            raise ValueError("task_weight and format_weight are both 0: nothing to learn from")
        return self


class GRPORLMConfig(RLMConfig):
    """The RLM loop settings for GRPO episodes: the same fields, with defaults for RL (sampled, short)."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature of the root model; must be > 0 so the episodes of a group differ."""
    max_iterations: int = Field(4, ge=1)
    """Root turns with code before the model is told to answer now (one extra, final turn)."""
    root_max_tokens: int = Field(512, ge=1)
    """Max new tokens per root turn."""
    max_wall_s: float | None = Field(300.0, gt=0)
    """Wall-clock seconds for the whole episode; None = unlimited."""

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0: with greedy decoding every episode of a group is the same, "
                             "so every GRPO advantage is 0 (use e.g. rlm.temperature=1.0)")
        return value


class GRPOConfig(StrictModel):
    """`rlm-train grpo` config: one recipe YAML plus KEY=VALUE overrides."""

    model: str
    """Policy to train: a Hugging Face model directory (e.g. a merged SFT output), or 'gemma3-270m'."""
    adapter: str | None = None
    """Start from this LoRA adapter (e.g. the SFT adapter) instead of a fresh one; needs lora.enabled."""
    prompts: str
    """RL prompt set: a task JSONL (rlm-train/task/v1) or the RL dataset from `rlm-train filter` (directory or JSONL)."""
    output_dir: str
    """Where checkpoints, adapter/ (or model/), rollouts.jsonl, metrics.jsonl and the config go."""
    chat_template: str = "auto"
    """'auto' (ours for Qwen3/Gemma-3), 'qwen3', 'gemma3', 'model' or a .jinja file. Must extend turn by turn."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Where to train; 'cuda' with no GPU stops at once; 'auto' uses CUDA when present."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype: float32 on this AVX2 CPU (no fast bf16), bfloat16 on GPUs."""
    attn_implementation: str = "sdpa"
    """Attention kernel."""
    num_threads: int | None = None
    """torch CPU threads; null leaves torch's default."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings; lora.enabled=false trains all weights."""
    training: GRPOTrainingSettings = GRPOTrainingSettings()
    """GRPO optimizer, group size and loss settings."""
    rollout: RolloutSettings = RolloutSettings()
    """How episodes are generated."""
    rlm: GRPORLMConfig = GRPORLMConfig()
    """The RLM loop settings of every episode (turns, budgets, sandbox limits, sampling temperature)."""
    reward: RewardSettings = RewardSettings()
    """Reward weights."""
    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Extra metric sinks, used only when installed (stdout and metrics.jsonl are always written)."""
    requires: Requirements = Requirements()
    """Hardware the recipe needs; checked before any loading."""
    launch: LaunchSettings = LaunchSettings()
    """How a multi-process run is launched."""


def check_config(cfg: GRPOConfig, source: str) -> None:
    """Settings that contradict each other across sections (a UserError naming the keys and the fix)."""
    if cfg.adapter and not cfg.lora.enabled:
        raise UserError(f"{source}: adapter needs lora.enabled=true (it continues training that adapter)")
    if cfg.rollout.backend == "transformers" and cfg.launch.num_processes > 1:
        raise UserError(
            f"{source}: rollout.backend=transformers generates in-process and cannot run with "
            f"launch.num_processes={cfg.launch.num_processes} (episodes of different lengths would deadlock "
            "sharded generation); use rollout.backend=vllm_server"
        )
