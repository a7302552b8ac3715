"""GRPO with full RLM episodes as rollouts (TRL `GRPOTrainer` + PEFT).

Each completion TRL asks for is one whole RLM episode, run by the project's one loop
(`rlm_train.rlm.run_episode`) in the sandbox. The root model of that episode is the
policy being trained: `EpisodeRecorder` generates every root turn with the trainer's
current weights (in-process transformers on CPU, a vLLM server in TRL's server mode on
GPUs) and records the token ids, so what TRL trains on is exactly what was sampled:

    prompt_ids      the first prompt (system + user), as rendered by the chat template
    completion_ids  turn 1 tokens | REPL feedback turn | turn 2 tokens | ...
    env_mask        1         ... | 0               ... | 1          ... (REPL output never trained)

Generation is token-in/token-out: the next turn's prompt is the previous prompt plus the
sampled ids plus the tokenized feedback, never a re-tokenization of decoded text.

The reward is the task's scorer on the episode's FINAL answer plus an optional format
reward. Episodes that fail for reasons outside the policy (sandbox or server trouble)
get no reward (None), so TRL leaves them out of the group baseline.

The RL prompt set (`data.prompts`) is either
- a task file (`rlm-train/task/v1` JSONL, e.g. from `rlm-train tasks`), or
- an RL prompt set from `rlm-train filter`: a `save_to_disk` directory or JSONL whose rows
  have `prompt` (the episode's first messages), `task_id` and `task` (the task record,
  a JSON string or object; `context_path` relative to the dataset, or absolute).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, field_validator, model_validator

from rlm_train.config import StrictModel
from rlm_train.errors import UserError
from rlm_train.models.base import Completion, PolicyError, SamplingParams
from rlm_train.rlm import RLMConfig
from rlm_train.train.common import (
    LaunchSettings,
    LoraSettings,
    OptimizerLoopSettings,
    Requirements,
    cuda_count,
    hardware_problems,
    installed_reporters,
    load_train_split,
    lora_config,
    pick_device,
    plan_footer,
)

# ---------------------------------------------------------------------------
# Config


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
    policy spec: scripted | oracle | openai:MODEL (with sub_policy_base_urls)."""
    sub_policy_base_urls: list[str] = []
    """Servers for an openai: sub_policy."""
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


# ---------------------------------------------------------------------------
# The RL prompt set


@dataclass
class PromptSet:
    rows: list[dict[str, Any]]  # {"prompt": messages, "task_id": str}: what TRL iterates over
    tasks: dict[str, dict[str, Any]]  # task_id -> task record
    base_dirs: dict[str, Path]  # task_id -> directory its context_path is relative to
    source: str


def load_prompt_set(path: str | os.PathLike, rlm: RLMConfig) -> PromptSet:
    """Read a task file or an RL prompt set into rows for TRL plus the task records the rewards need."""
    path = Path(path).expanduser()
    if path.is_dir():
        rows, base = _read_dataset_dir(path), path
    elif path.is_file():
        from rlm_train.formats import read_jsonl

        rows, base = read_jsonl(path), path.parent
    else:
        raise UserError(f"prompts {path} not found: pass a task JSONL (rlm-train tasks) or the RL prompt set "
                        "from `rlm-train filter` (a directory or .jsonl)")
    if not rows:
        raise UserError(f"{path}: no prompts in it")
    tasks: dict[str, dict[str, Any]] = {}
    base_dirs: dict[str, Path] = {}
    out: list[dict[str, Any]] = []
    task_files: dict[Path, dict[str, dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        row_base = base
        if "task_file" in row and "task" not in row:
            # `rlm-train filter` rows reference their task by file and id.
            row, row_base = _resolve_task_reference(row, base, task_files, f"{path} row {i}")
        task = _task_of_row(row, f"{path} row {i}")
        task_id = task["id"]
        if task_id in tasks and tasks[task_id] != task:
            raise UserError(f"{path} row {i}: task id {task_id!r} appears twice with different content; ids must be unique")
        tasks[task_id] = task
        base_dirs[task_id] = row_base
        prompt = row.get("prompt") if "task" in row else None
        if prompt is None:
            prompt = initial_messages(task, load_context(task, base), rlm)
        out.append({"prompt": prompt, "task_id": task_id})
    return PromptSet(rows=out, tasks=tasks, base_dirs=base_dirs, source=str(path))


def _resolve_task_reference(row, base: Path, cache: dict, where: str) -> tuple[dict[str, Any], Path]:
    """An RL prompt row {task_file, task_id, prompt, ...} -> the row with its task record, and
    the directory the task's context_path is relative to."""
    from rlm_train.formats import read_jsonl

    task_file = Path(row["task_file"])
    if not task_file.is_absolute() and not task_file.is_file():
        task_file = base / task_file
    if not task_file.is_file():
        raise UserError(f"{where}: task_file {row['task_file']!r} not found; re-run `rlm-train filter --tasks FILE`")
    if task_file not in cache:
        cache[task_file] = {t["id"]: t for t in read_jsonl(task_file) if "id" in t}
    task = cache[task_file].get(row.get("task_id"))
    if task is None:
        raise UserError(f"{where}: task {row.get('task_id')!r} is not in {task_file}")
    return {**row, "task": task}, task_file.parent


def _read_dataset_dir(path: Path) -> list[dict[str, Any]]:
    return [dict(r) for r in load_train_split(path)]


def _task_of_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A row is a task record itself, or an RL prompt row carrying one under `task`."""
    from rlm_train.formats import TASK_SCHEMA

    task = row.get("task", row)
    if isinstance(task, str):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: column 'task' is not valid JSON ({exc.msg})") from None
    if not isinstance(task, dict) or task.get("schema") != TASK_SCHEMA:
        raise UserError(
            f"{where}: expected a task record (schema {TASK_SCHEMA!r}) or an RL prompt row with a 'task' column; "
            "make the prompt set with `rlm-train tasks` or `rlm-train filter`"
        )
    for key in ("id", "query"):
        if not isinstance(task.get(key), str) or not task[key]:
            raise UserError(f"{where}: task field {key!r} must be a non-empty string")
    if "answer" not in task:
        raise UserError(f"{where}: task {task['id']!r} has no 'answer', so no reward can be computed")
    if "task_id" in row and row["task_id"] != task["id"]:
        raise UserError(f"{where}: task_id {row['task_id']!r} does not match its task's id {task['id']!r}")
    return task


def load_context(task: dict[str, Any], base_dir: Path) -> Any:
    from rlm_train.formats import load_task_context

    # load_task_context resolves context_path beside a task *file*; any name in base_dir will do.
    return load_task_context(task, Path(base_dir) / "_")


def initial_messages(task: dict[str, Any], context: Any, rlm: RLMConfig) -> list[dict[str, str]]:
    """The first two messages the RLM loop will send (for TRL's prompt column and logs)."""
    from rlm_train.rlm import prompts

    return [
        {"role": "system", "content": prompts.system_prompt(rlm.prompt_style, context, rlm.sub_model_chars)},
        {"role": "user", "content": prompts.first_user_prompt(task["query"], context)},
    ]


# ---------------------------------------------------------------------------
# Token generation backends (blocking; called from a worker thread)


@dataclass
class GenOutput:
    ids: list[int]
    logprobs: list[float] | None = None  # sampling logprob of each id (vLLM), None when not known


class TransformersBackend:
    """Generates with the trainer's current model, in-process (CPU, or one GPU)."""

    max_inflight = 1  # one model instance: batches run one after another

    def __init__(self, trainer: Any, tokenizer: Any, stop_ids: list[int]):
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids

    def generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenOutput]:
        import torch
        from trl.models import unwrap_model_for_generation

        trainer = self.trainer
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": pad,
            "use_cache": True,
            "do_sample": sampling.temperature > 0,
        }
        if sampling.temperature > 0:
            # Plain temperature sampling: TRL scores tokens with logits / temperature and nothing else.
            kwargs.update(temperature=sampling.temperature, top_p=1.0, top_k=0)
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model, torch.no_grad():
            was_training = model.training
            model.eval()
            try:
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
            finally:
                model.train(was_training)
        results = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            results.append(GenOutput(row[:cut]))
        return results


class VLLMServerBackend:
    """Generates with a `vllm serve` process (TRL server mode; TRL pushes the weights before each rollout)."""

    max_inflight = 32  # the server batches concurrent requests itself

    def __init__(self, client: Any, stop_ids: list[int]):
        self.client = client  # trl.generation.vllm_client.VLLMClient or anything with its generate()
        self.stop_ids = stop_ids

    def generate_batch(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenOutput]:
        out = self.client.generate(
            prompts=prompts, n=1, temperature=sampling.temperature, top_p=1.0, top_k=0,
            max_tokens=sampling.max_tokens, logprobs=0,
            generation_kwargs={"stop_token_ids": list(self.stop_ids)},
        )
        logprobs = out.get("logprobs")
        results = []
        for i, ids in enumerate(out["completion_ids"]):
            lps = None
            if logprobs is not None:
                # Top-1 entry is the sampled token's logprob (None where vLLM had NaN).
                lps = [float("nan") if lp[0] is None else lp[0] for lp in logprobs[i]]
            results.append(GenOutput(list(ids), lps))
        return results


class BatchingGenerator:
    """Async front of a blocking backend: requests that arrive together (concurrent episodes' turns) go
    to the backend as one batch. `backend.max_inflight` batches run at once (1 for an in-process model,
    many for a server, so a slow batch does not hold up episodes that are ready). A backend failure
    fails the whole rollout, never a silent zero reward."""

    def __init__(self, backend: Any, wait_s: float = 0.02):
        self.backend = backend
        self.wait_s = wait_s
        self.pending: list[tuple[list[int], SamplingParams, asyncio.Future]] = []
        self.flusher: asyncio.Task | None = None
        self.slots: asyncio.Semaphore | None = None
        self.running: set[asyncio.Task] = set()
        self.fatal: BaseException | None = None
        self.calls = 0

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> GenOutput:
        if self.fatal is not None:
            raise PolicyError(f"generation backend failed: {self.fatal}")
        if self.slots is None:
            self.slots = asyncio.Semaphore(getattr(self.backend, "max_inflight", 1))
        future = asyncio.get_running_loop().create_future()
        self.pending.append((prompt_ids, sampling, future))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self.pending:
            await asyncio.sleep(self.wait_s)  # let the other episodes' turns join this batch
            await self.slots.acquire()  # while waiting here, more requests join the next batch
            batch, self.pending = self.pending, []
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault((item[1].max_tokens, item[1].temperature), []).append(item)
            for i, items in enumerate(groups.values()):
                if i:  # the first group's slot is already held
                    await self.slots.acquire()
                task = asyncio.create_task(self._run(items))
                self.running.add(task)
                task.add_done_callback(self.running.discard)

    async def _run(self, items: list) -> None:
        try:
            outs = await asyncio.to_thread(self.backend.generate_batch, [p for p, _, _ in items], items[0][1])
            self.calls += 1
        except Exception as exc:  # noqa: BLE001 - the rollout re-raises it after the batch
            self.fatal = exc
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(PolicyError(f"generation backend failed: {exc}"))
            return
        finally:
            self.slots.release()
        for (_, _, fut), out in zip(items, outs):
            if not fut.done():
                fut.set_result(out)


# ---------------------------------------------------------------------------
# Policies used inside episodes


class GeneratorPolicy:
    """A Policy over the generator that records nothing: sub-calls (sub_policy=same) and child RLMs."""

    def __init__(self, generator: BatchingGenerator, tokenizer: Any, name: str = "trained-model"):
        self.generator = generator
        self.tokenizer = tokenizer
        self.name = name

    async def chat(self, messages, sampling=None, hints=None) -> Completion:
        from rlm_train.models.loading import render_chat

        sampling = sampling or SamplingParams()
        started = time.monotonic()
        prompt = self.tokenizer(render_chat(self.tokenizer, messages, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
        out = await self.generator.generate(prompt, sampling)
        text = self.tokenizer.decode(out.ids, skip_special_tokens=True)
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(out.ids),
                          latency_s=time.monotonic() - started, finish_reason="stop",
                          extra={"completion_ids": out.ids})

    async def aclose(self) -> None:
        return None


class EpisodeRecorder:
    """The root policy of ONE episode: generates with the trained model and records its token stream.

    The first root call fixes the prompt ids. Each later call must extend the conversation by the
    assistant text we returned plus new messages (REPL feedback); those are rendered by the chat
    template, tokenized, and appended with mask 0; the sampled ids are appended with mask 1.
    Calls from child RLMs (depth > 0) are generated but not recorded.
    """

    def __init__(self, generator: BatchingGenerator, tokenizer: Any, stop_ids: list[int], max_completion_tokens: int):
        self.generator = generator
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_completion_tokens = max_completion_tokens
        self.name = "trained-model"
        self.unrecorded = GeneratorPolicy(generator, tokenizer)
        self.prompt_ids: list[int] | None = None
        self.completion_ids: list[int] = []
        self.env_mask: list[int] = []
        self.logprobs: list[float] = []
        self.has_logprobs = True
        self.budget_hit = False
        self._rendered = ""  # the template's text of the prompt of the last call
        self._last_text = ""  # the assistant text we returned last
        self._last_stop = ""  # the text of the stop token the last turn ended with ("" if cut)

    async def chat(self, messages, sampling=None, hints=None) -> Completion:
        hints = hints or {}
        if hints.get("depth", 0) != 0:
            return await self.unrecorded.chat(messages, sampling, hints)
        from rlm_train.models.loading import render_chat

        sampling = sampling or SamplingParams()
        started = time.monotonic()
        rendered = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        if self.prompt_ids is None:
            self.prompt_ids = self._encode(rendered)
        else:
            anchor = self._rendered + self._last_text
            if not rendered.startswith(anchor):
                raise PolicyError(
                    "the chat template does not extend the conversation turn by turn (the rendered history "
                    "differs from what the model saw); use a template that renders past turns verbatim (qwen3, gemma3)"
                )
            suffix = rendered[len(anchor):]
            if self._last_stop and suffix.startswith(self._last_stop):
                suffix = suffix[len(self._last_stop):]  # the sampled stop token already closed the turn
            env_ids = self._encode(suffix)
            if len(self.completion_ids) + len(env_ids) >= self.max_completion_tokens:
                self.budget_hit = True
                raise PolicyError(f"episode reached rollout.max_completion_tokens={self.max_completion_tokens}")
            self._append(env_ids, 0, None)
        self._rendered = rendered
        room = self.max_completion_tokens - len(self.completion_ids)
        turn_sampling = SamplingParams(max_tokens=min(sampling.max_tokens, room), temperature=sampling.temperature,
                                       top_p=sampling.top_p, stop=None, seed=sampling.seed)
        out = await self.generator.generate(self.prompt_ids + self.completion_ids, turn_sampling)
        self._append(out.ids, 1, out.logprobs)
        ended = bool(out.ids) and out.ids[-1] in self.stop_ids
        if not ended and len(self.completion_ids) >= self.max_completion_tokens:
            self.budget_hit = True
        text = self.tokenizer.decode(out.ids, skip_special_tokens=True)
        self._last_text = text
        self._last_stop = self.tokenizer.decode(out.ids[-1:]) if ended else ""
        return Completion(
            text=text, prompt_tokens=len(self.prompt_ids) + len(self.completion_ids) - len(out.ids),
            completion_tokens=len(out.ids), latency_s=time.monotonic() - started,
            finish_reason="stop" if ended else "length", extra={"completion_ids": out.ids},
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _append(self, ids: list[int], mask: int, logprobs: list[float] | None) -> None:
        self.completion_ids += ids
        self.env_mask += [mask] * len(ids)
        if logprobs is None:
            self.has_logprobs = self.has_logprobs and mask == 0
            logprobs = [0.0] * len(ids)  # env tokens: masked out of the loss and the IS correction
        self.logprobs += logprobs

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------------------
# Rewards: pure functions of the episode fields the rollout returns


def task_reward_value(task: dict[str, Any], final: Any, outcome: str, infra_error: bool, scorer: Callable) -> float | None:
    """The scorer on the FINAL answer; 0 without one; None when the episode broke for reasons outside the policy."""
    if infra_error:
        return None
    if final is None:
        return 0.0
    return float(scorer(task, final))


def format_reward_value(turns: int, turns_with_code: int, outcome: str, infra_error: bool) -> float | None:
    """Half for the share of root turns that ran a ```repl block, half for ending with FINAL."""
    if infra_error:
        return None
    share = turns_with_code / turns if turns else 0.0
    return 0.5 * share + 0.5 * (1.0 if outcome == "final" else 0.0)


def make_reward_funcs(cfg: GRPOConfig, tasks: dict[str, dict[str, Any]], scorer: Callable, log: "RolloutLog"):
    """TRL reward functions (named for its logs) and their weights."""

    def task_score(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            task_reward_value(tasks[tid], final, outcome, bad, scorer)
            for tid, final, outcome, bad in zip(kw["task_id"], kw["rlm_final"], kw["rlm_outcome"], kw["rlm_infra_error"])
        ]
        log.note_rewards("task_score", kw["rlm_episode_id"], values)
        return values

    def repl_format(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            format_reward_value(n, n_code, outcome, bad)
            for n, n_code, outcome, bad in zip(kw["rlm_turns"], kw["rlm_turns_with_code"], kw["rlm_outcome"],
                                               kw["rlm_infra_error"])
        ]
        log.note_rewards("repl_format", kw["rlm_episode_id"], values)
        return values

    funcs, weights = [], []
    if cfg.reward.task_weight > 0:
        funcs.append(task_score)
        weights.append(cfg.reward.task_weight)
    if cfg.reward.format_weight > 0:
        funcs.append(repl_format)
        weights.append(cfg.reward.format_weight)
    return funcs, weights


def load_task_scorer() -> Callable:
    try:
        from rlm_train.tasks import score
    except ImportError:
        try:
            from rlm_train.tasks.scoring import score
        except ImportError:
            raise UserError("the task scorer (rlm_train.tasks.score) is not available in this version") from None
    return score


# ---------------------------------------------------------------------------
# The rollout function


class RolloutLog:
    """Episodes of the current batch, written to rollouts.jsonl once their rewards are known."""

    def __init__(self, path: Path | None):
        self.path = path
        self.step = 0
        self.episodes: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []  # per batch: summary for tests and logs

    def add(self, episode_id: str, record: dict[str, Any]) -> None:
        self.episodes[episode_id] = record

    def note_rewards(self, name: str, episode_ids: list[str], values: list[float | None]) -> None:
        for eid, value in zip(episode_ids, values):
            if eid in self.episodes:
                self.episodes[eid].setdefault("rewards", {})[name] = value

    def flush(self) -> None:
        if self.path is not None and self.episodes:
            from rlm_train.formats import append_jsonl

            for record in self.episodes.values():
                append_jsonl(self.path, record)
        self.episodes = {}


def make_rollout_func(cfg: GRPOConfig, tokenizer: Any, prompt_set: PromptSet,
                      backend_factory: Callable[[Any], Any], log: RolloutLog,
                      sub_policy_factory: Callable[[], Any] | None = None):
    """rollout_func(prompts, trainer) for TRL: one full RLM episode per prompt (TRL repeats each prompt
    num_generations times), returning token ids, env_mask and the episode fields the rewards read."""
    from rlm_train.models.loading import end_of_turn_ids

    stop_ids = end_of_turn_ids(tokenizer)
    backend_cache: dict[str, Any] = {}

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        rows = getattr(trainer, "rlm_batch_rows", None)
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("rollout_func needs the batch rows: use the trainer from make_trainer_class()")
        log.flush()  # the previous batch's rewards are in by now
        if "backend" not in backend_cache:
            backend_cache["backend"] = backend_factory(trainer)
        generator = BatchingGenerator(backend_cache["backend"], cfg.rollout.batch_wait_s)
        started = time.monotonic()
        episodes = asyncio.run(_run_batch(cfg, rows, prompt_set, generator, tokenizer, stop_ids, sub_policy_factory))
        if generator.fatal is not None:
            raise RuntimeError(f"rollout generation failed: {generator.fatal}") from generator.fatal
        out = _collect(episodes, tokenizer, log, trainer.state.global_step)
        n_final = sum(e["trajectory"]["final"] is not None for e in episodes)
        print(f"[grpo] step {trainer.state.global_step}: {len(episodes)} episodes in {time.monotonic() - started:.1f}s, "
              f"{n_final} answered, {generator.calls} generate calls", flush=True)
        return out

    return rollout_func


async def _run_batch(cfg, rows, prompt_set, generator, tokenizer, stop_ids, sub_policy_factory) -> list[dict]:
    from rlm_train.rlm import run_episode

    seen: Counter = Counter()
    jobs = []
    for row in rows:
        task_id = row["task_id"]
        jobs.append((task_id, seen[task_id]))  # sample index within this batch's group
        seen[task_id] += 1
    contexts: dict[str, Any] = {}
    for task_id in seen:
        contexts[task_id] = await asyncio.to_thread(load_context, prompt_set.tasks[task_id], prompt_set.base_dirs[task_id])
    sub_policy = sub_policy_factory() if sub_policy_factory else GeneratorPolicy(generator, tokenizer)
    semaphore = asyncio.Semaphore(cfg.rollout.concurrency)

    async def one(task_id: str, sample: int) -> dict:
        task = prompt_set.tasks[task_id]
        recorder = EpisodeRecorder(generator, tokenizer, stop_ids, cfg.rollout.max_completion_tokens)
        hints = {"family": task.get("family"), "task_id": task_id, "sample": sample, "meta": task.get("meta") or {}}
        async with semaphore:
            traj = await run_episode(task["query"], contexts[task_id], recorder, sub_policy, cfg.rlm,
                                     hints=hints, task_id=task_id)
        traj["sample"] = sample
        return {"task_id": task_id, "recorder": recorder, "trajectory": traj}

    try:
        return list(await asyncio.gather(*(one(t, k) for t, k in jobs)))
    finally:
        await sub_policy.aclose()


def _is_infra_error(traj: dict[str, Any], recorder: EpisodeRecorder) -> bool:
    """An episode that broke for reasons outside the policy: no reward, not a 0."""
    return traj["outcome"] == "error" and not recorder.budget_hit


def _collect(episodes: list[dict], tokenizer: Any, log: RolloutLog, step: int) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in (
        "prompt_ids", "completion_ids", "logprobs", "env_mask", "rlm_episode_id", "rlm_final", "rlm_outcome",
        "rlm_turns", "rlm_turns_with_code", "rlm_infra_error")}
    all_logprobs = True
    for ep in episodes:
        rec: EpisodeRecorder = ep["recorder"]
        traj = ep["trajectory"]
        prompt_ids = rec.prompt_ids
        completion_ids, env_mask, logprobs = list(rec.completion_ids), list(rec.env_mask), list(rec.logprobs)
        if prompt_ids is None:  # the episode broke before the model was asked anything
            prompt_ids = [tokenizer.pad_token_id]
        if not completion_ids:  # TRL needs at least one completion token; this one is never trained
            completion_ids, env_mask, logprobs = [tokenizer.pad_token_id], [0], [0.0]
        all_logprobs = all_logprobs and rec.has_logprobs
        infra = _is_infra_error(traj, rec)
        turns = traj["turns"]
        out["prompt_ids"].append(prompt_ids)
        out["completion_ids"].append(completion_ids)
        out["env_mask"].append(env_mask)
        out["logprobs"].append(logprobs)
        out["rlm_episode_id"].append(traj["id"])
        out["rlm_final"].append(traj["final"])
        out["rlm_outcome"].append(traj["outcome"])
        out["rlm_turns"].append(len(turns))
        out["rlm_turns_with_code"].append(sum(1 for t in turns if t["code_blocks"]))
        out["rlm_infra_error"].append(infra)
        log.add(traj["id"], {**traj, "grpo_step": step, "model_tokens": sum(env_mask),
                             "env_tokens": len(env_mask) - sum(env_mask), "infra_error": infra})
    if not all_logprobs:
        out["logprobs"] = None  # transformers backend: TRL recomputes what it needs
    return out


# ---------------------------------------------------------------------------
# Trainer wiring


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


def resource_problems(cfg: GRPOConfig) -> list[str]:
    """What this machine lacks for the recipe (empty: runnable here)."""
    import importlib.util

    problems = hardware_problems(cfg.requires, cfg.device, cfg.dtype == "bfloat16",
                                 "recipes/tiny-cpu-grpo.yaml", "slurm/grpo.sbatch")
    wants_vllm = cfg.requires.vllm or cfg.rollout.backend == "vllm_server"
    if wants_vllm and importlib.util.find_spec("vllm") is None:
        problems.append(
            "rollout.backend=vllm_server needs the vllm package in the training environment (TRL's server mode "
            "imports it to push weights); pip install vllm on the GPU node, or set rollout.backend=transformers"
        )
    if cfg.rollout.backend == "vllm_server" and cuda_count() == 0:
        problems.append(
            "rollout.backend=vllm_server pushes weights to the server over NCCL, which needs CUDA GPUs "
            "(this machine has none); on CPU use rollout.backend=transformers"
        )
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


def default_backend_factory(cfg: GRPOConfig, tokenizer: Any) -> Callable[[Any], Any]:
    from rlm_train.models.loading import end_of_turn_ids

    stop_ids = end_of_turn_ids(tokenizer)

    def factory(trainer: Any) -> Any:
        if cfg.rollout.backend == "transformers":
            return TransformersBackend(trainer, tokenizer, stop_ids)
        from trl.generation.vllm_client import VLLMClient

        # A plain HTTP client per process; TRL's own client (main process) does the weight pushes.
        client = VLLMClient(base_url=cfg.rollout.vllm_server_url, connection_timeout=cfg.rollout.vllm_server_timeout_s)
        return VLLMServerBackend(client, stop_ids)

    return factory


def sub_policy_factory(cfg: GRPOConfig) -> Callable[[], Any] | None:
    """None means 'same': the rollout wraps its own generator. Otherwise a fresh policy per rollout
    (async clients are bound to the event loop of the rollout that uses them)."""
    spec = cfg.rollout.sub_policy
    if spec == "same":
        return None
    from rlm_train.models.spec import build_policy, parse_policy_spec

    parse_policy_spec(spec)  # a bad spec fails before any loading
    return lambda: build_policy(spec, base_urls=cfg.rollout.sub_policy_base_urls)


def run_grpo(cfg: GRPOConfig, source: str = "config", *, scorer: Callable | None = None,
             backend_factory: Callable[[Any], Any] | None = None,
             on_batch: Callable[[dict, dict], None] | None = None,
             on_trainer: Callable[[Any], None] | None = None) -> dict:
    """Train; returns a summary. `scorer`, `backend_factory`, `on_batch`, `on_trainer` are for tests
    (a scripted generator, capturing TRL's batch, snapshotting weights)."""
    check_config(cfg, source)
    problems = resource_problems(cfg)
    hard = [p for p in problems if "bfloat16 on this CPU" not in p]
    if hard:
        raise UserError(f"{source}: {hard[0]}")
    for p in set(problems) - set(hard):
        print(f"[grpo] warning: {p}", flush=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; we pin TRL

    from rlm_train.models.loading import load_causal_lm, load_peft_adapter, load_tokenizer, resolve_model

    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    scorer = scorer or load_task_scorer()
    make_sub = sub_policy_factory(cfg)
    model_path = resolve_model(cfg.model)
    prompt_set = load_prompt_set(cfg.prompts, cfg.rlm)  # before the model: bad data fails in seconds
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    check_template_extends(tokenizer)
    print(f"[grpo] {len(prompt_set.rows)} prompts over {len(prompt_set.tasks)} tasks from {prompt_set.source}", flush=True)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_config.json").write_text(cfg.model_dump_json(indent=2))
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
        callbacks=[_metrics_callback(out / "metrics.jsonl")],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our callback prints a compact line instead
    if on_trainer is not None:
        on_trainer(trainer)
    started = time.perf_counter()
    result = trainer.train()
    log.flush()
    wall = time.perf_counter() - started
    saved = _save(cfg, trainer, tokenizer, model_path)
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"output_dir": str(out), "global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "rewards": [h["reward"] for h in history], "wall_s": wall, **saved}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _save(cfg: GRPOConfig, trainer: Any, tokenizer: Any, model_path: Path) -> dict:
    from rlm_train.models.loading import write_adapter_meta

    out = Path(cfg.output_dir)
    target = out / ("adapter" if cfg.lora.enabled else "model")
    trainer.model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if cfg.lora.enabled:
        write_adapter_meta(target, str(model_path), cfg.chat_template)
    return {"adapter_dir" if cfg.lora.enabled else "model_dir": str(target)}


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            record = {"step": state.global_step, "time": time.time(), **(logs or {})}
            with path.open("a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
            keys = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "learning_rate")
            shown = " ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in record.items() if k in keys)
            if shown:
                print(f"[grpo] step {state.global_step}/{state.max_steps} {shown}", flush=True)

    return MetricsCallback()
