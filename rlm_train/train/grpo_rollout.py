"""GRPO rollouts: one whole RLM episode per completion TRL asks for.

Each episode runs the project's one loop (`rlm_train.rlm.run_episode`) in the sandbox. Its root
policy is an `EpisodeRecorder`, which generates with the trained model and records the token ids,
so what TRL trains on is exactly what was sampled:

    prompt_ids      the first prompt (system + user), as rendered by the chat template
    completion_ids  turn 1 tokens | REPL feedback turn | turn 2 tokens | ...
    env_mask        1         ... | 0               ... | 1          ... (REPL output never trained)

The next turn's prompt is the previous prompt plus the sampled ids plus the tokenized feedback,
never a re-tokenization of decoded text.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, TypedDict

from rlm_train.errors import UserError
from rlm_train.models.base import CallContext, Completion, PolicyError, Role, SamplingParams
from rlm_train.records import TrajectoryRecord
from rlm_train.rlm.budget import BudgetExhausted
from rlm_train.rollouts.rl_prompts import PromptSet, load_context
from rlm_train.train.grpo_backends import BatchingGenerator, GenOutput
from rlm_train.train.grpo_config import completion_token_cap
from rlm_train.train.grpo_episodes import (
    EpisodeClock,
    EpisodeEnd,
    RolloutLog,
    TimedPolicy,
    classify_episode,
    episode_timeout_s,
    is_scored,
)
from rlm_train.train.interrupt import agree_on_abandoning, run_until_stopped

if TYPE_CHECKING:
    from rlm_train.train.grpo_config import GRPOConfig

# ---------------------------------------------------------------------------
# Policies used inside episodes


class GeneratorPolicy:
    """A Policy over the generator that records nothing: sub-calls (sub_policy=same) and child RLMs."""

    def __init__(self, generator: BatchingGenerator, tokenizer: Any, name: str = "trained-model",
                 clock: EpisodeClock | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.name = name
        self.clock = clock

    async def chat(self, messages, sampling=None, call=None) -> Completion:
        from rlm_train.models.loading import render_chat

        sampling = sampling or SamplingParams()
        started = time.monotonic()
        prompt = self.tokenizer(render_chat(self.tokenizer, messages, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
        out = await _timed_generate(self.generator, self.clock, prompt, sampling)
        text = self.tokenizer.decode(out.ids, skip_special_tokens=True)
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(out.ids),
                          latency_s=time.monotonic() - started, finish_reason="stop",
                          extra={"completion_ids": out.ids})

    async def aclose(self) -> None:
        return None


async def _timed_generate(generator: BatchingGenerator, clock: EpisodeClock | None, prompt: list[int],
                          sampling: SamplingParams) -> GenOutput:
    if clock is None:
        return await generator.generate(prompt, sampling)
    clock.wait_begins()
    try:
        return await generator.generate(prompt, sampling)
    finally:
        clock.wait_ends()


class TemplateMismatch(PolicyError):
    """The chat template re-rendered the history differently from what the model saw (e.g. it drops past
    thinking blocks): a configuration error that stops training, never an infrastructure failure."""


TEMPLATE_MISMATCH = (
    "the chat template does not extend the conversation turn by turn (the rendered history differs from what "
    "the model saw, e.g. past <think> blocks dropped); use a template that renders past turns verbatim "
    "(chat_template=qwen3 or gemma3)"
)


def is_trained_call(call: CallContext | None) -> bool:
    """Whether a call's sampled tokens go into GRPO's loss: the root episode's own turns only, decided
    from the loop's typed context (never from hints); a child RLM's turns and sub-calls are not."""
    return call is not None and call.role == Role.ROOT and call.depth == 0


class EpisodeRecorder:
    """The root policy of ONE episode: generates with the trained model and records its token stream.

    The first root call fixes the prompt ids. Each later call must extend the conversation by the
    assistant text we returned plus new messages (REPL feedback); those are rendered by the chat
    template, tokenized, and appended with mask 0; the sampled ids are appended with mask 1.
    Other calls (child RLMs, sub-calls: `is_trained_call`) are generated but not recorded. An episode
    the recorder cuts (rollout.max_completion_tokens, or its own time past rlm.max_wall_s) ends as
    budget_exhausted, not as a model error.
    """

    def __init__(self, generator: BatchingGenerator, tokenizer: Any, stop_ids: list[int], max_completion_tokens: int,
                 max_wall_s: float | None = None, clock: EpisodeClock | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.max_completion_tokens = max_completion_tokens
        self.max_wall_s = max_wall_s  # of the policy's own time (the clock's policy_s)
        self.clock = clock or EpisodeClock()
        self.name = "trained-model"
        self.unrecorded = GeneratorPolicy(generator, tokenizer, clock=self.clock)
        self.cut: str | None = None  # why the recorder ended the episode: 'tokens' or 'wall'
        self.template_error: str | None = None
        self.prompt_ids: list[int] | None = None
        self.completion_ids: list[int] = []
        self.env_mask: list[int] = []
        self.logprobs: list[float] = []
        self.has_logprobs = True
        self._rendered = ""  # the template's text of the prompt of the last call
        self._last_text = ""  # the assistant text we returned last
        self._last_stop = ""  # the text of the stop token the last turn ended with ("" if cut)

    async def chat(self, messages, sampling=None, call=None) -> Completion:
        if not is_trained_call(call):
            return await self.unrecorded.chat(messages, sampling, call)
        from rlm_train.models.loading import render_chat

        sampling = sampling or SamplingParams()
        started = time.monotonic()
        rendered = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        if self.prompt_ids is None:
            self.prompt_ids = self._encode(rendered)
        else:
            anchor = self._rendered + self._last_text
            if not rendered.startswith(anchor):
                self.template_error = TEMPLATE_MISMATCH
                raise TemplateMismatch(TEMPLATE_MISMATCH)
            suffix = rendered[len(anchor):]
            if self._last_stop and suffix.startswith(self._last_stop):
                suffix = suffix[len(self._last_stop):]  # the sampled stop token already closed the turn
            env_ids = self._encode(suffix)
            if len(self.completion_ids) + len(env_ids) >= self.max_completion_tokens:
                self._cut("tokens")
                raise BudgetExhausted(f"episode reached rollout.max_completion_tokens={self.max_completion_tokens}")
            if self.max_wall_s is not None and self.clock.policy_s() > self.max_wall_s:
                self._cut("wall")
                raise BudgetExhausted(f"episode used its rlm.max_wall_s={self.max_wall_s:g}s of its own time")
            self._append(env_ids, 0, None)
        self._rendered = rendered
        room = self.max_completion_tokens - len(self.completion_ids)
        turn_sampling = SamplingParams(max_tokens=min(sampling.max_tokens, room), temperature=sampling.temperature,
                                       top_p=sampling.top_p, stop=None, seed=sampling.seed)
        out = await _timed_generate(self.generator, self.clock, self.prompt_ids + self.completion_ids, turn_sampling)
        self._append(out.ids, 1, out.logprobs)
        ended = bool(out.ids) and out.ids[-1] in self.stop_ids
        if not ended and len(self.completion_ids) >= self.max_completion_tokens:
            self._cut("tokens")
        text = self.tokenizer.decode(out.ids, skip_special_tokens=True)
        self._last_text = text
        self._last_stop = self.tokenizer.decode(out.ids[-1:]) if ended else ""
        return Completion(
            text=text, prompt_tokens=len(self.prompt_ids) + len(self.completion_ids) - len(out.ids),
            completion_tokens=len(out.ids), latency_s=time.monotonic() - started,
            finish_reason="stop" if ended else "length", extra={"completion_ids": out.ids},
        )

    def _cut(self, reason: str) -> None:
        if self.cut is None:
            self.cut = reason

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


def sub_policy_factory(cfg: GRPOConfig) -> Callable[[], Any] | None:
    """None means 'same': the rollout wraps its own generator. Otherwise a fresh policy per rollout
    (async clients are bound to the event loop of the rollout that uses them)."""
    spec = cfg.rollout.sub_policy
    if spec == "same":
        return None
    from rlm_train.policies.spec import build_policy, parse_policy_spec

    parse_policy_spec(spec)  # a bad spec fails before any loading
    return lambda: build_policy(spec, cfg.rollout.sub_base_urls, cfg.rollout.client)


# ---------------------------------------------------------------------------
# The rollout function


def make_rollout_func(cfg: GRPOConfig, tokenizer: Any, prompt_set: PromptSet,
                      backend_factory: Callable[[Any], Any], log: RolloutLog, stop_ids: list[int],
                      sub_policy_factory: Callable[[], Any] | None = None):
    """rollout_func(prompts, trainer) for TRL: one full RLM episode per prompt (TRL repeats each prompt
    num_generations times), returning token ids, env_mask and the episode fields the rewards read.
    `backend_factory(trainer)` is called at every rollout (grpo_backends.one_backend makes it reuse one).
    `stop_ids` is the one stop set (see grpo.stop_token_ids) the generation and TRL share."""

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list | None]:
        rows = getattr(trainer, "rlm_batch_rows", None)
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("rollout_func needs the batch rows: use the trainer from make_trainer_class()")
        generator = BatchingGenerator(backend_factory(trainer), cfg.rollout.batch_wait_s)
        started = time.monotonic()
        episodes = run_until_stopped(_run_batch(cfg, rows, prompt_set, generator, tokenizer, stop_ids, sub_policy_factory))
        agree_on_abandoning(episodes is None)  # a signal came: every rank drops the step (interrupt.py)
        assert episodes is not None
        if generator.fatal is not None:
            raise RuntimeError(f"rollout generation failed: {generator.fatal}") from generator.fatal
        broken = next((e["recorder"].template_error for e in episodes if e["recorder"].template_error), None)
        if broken:
            raise UserError(f"{cfg.chat_template}: {broken}")
        out = _collect(cfg, episodes, tokenizer, log, trainer.state.global_step)
        _log_batch(trainer, out, time.monotonic() - started, generator.calls)
        return out

    return rollout_func


def _log_batch(trainer: Any, out: dict[str, Any], seconds: float, calls: int) -> None:
    """Episode counts of the batch summed over all ranks: one printed line (main process) and TRL metrics."""
    import torch

    ends = out["rlm_end"]
    local = [len(ends), sum(f is not None for f in out["rlm_final"]), ends.count("overlong"), ends.count("infra"), calls]
    accelerator = getattr(trainer, "accelerator", None)
    counts = torch.tensor(local, dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    n, answered, overlong, infra, total_calls = (int(x) for x in counts.tolist())
    from rlm_train.train import trl_compat

    if trl_compat.has_metrics(trainer) and n:
        for key, value in (("answered", answered), ("overlong", overlong), ("infra_error", infra)):
            trl_compat.metrics(trainer, "train")[f"rlm/{key}_frac"].append(value / n)
    if accelerator is None or accelerator.is_main_process:
        print(f"[grpo] step {trainer.state.global_step}: {n} episodes in {seconds:.1f}s, {answered} answered, "
              f"{overlong} over-long, {infra} infrastructure errors, {total_calls} generate calls", flush=True)


class RolloutEpisode(TypedDict):
    task_id: str
    recorder: EpisodeRecorder
    trajectory: TrajectoryRecord


async def _run_batch(cfg: GRPOConfig, rows: list[dict[str, Any]], prompt_set: PromptSet, generator: BatchingGenerator,
                     tokenizer: Any, stop_ids: list[int],
                     sub_policy_factory: Callable[[], Any] | None) -> list[RolloutEpisode]:
    from rlm_train.rlm import run_episode

    seen: Counter[str] = Counter()
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
    # The loop's own wall cap is the hard episode timeout; the policy's budget is the recorder's (own time only).
    loop_config = cfg.rlm.model_copy(update={"max_wall_s": episode_timeout_s(cfg)})

    async def one(task_id: str, sample: int) -> RolloutEpisode:
        task = prompt_set.tasks[task_id]
        recorder = EpisodeRecorder(generator, tokenizer, stop_ids, completion_token_cap(cfg),
                                   max_wall_s=cfg.rlm.max_wall_s)
        hints = {"family": task.get("family"), "task_id": task_id, "sample": sample, "meta": task.get("meta") or {}}
        async with semaphore:
            recorder.clock = recorder.unrecorded.clock = EpisodeClock()  # starts when the episode does
            traj = await run_episode(task["query"], contexts[task_id], recorder, TimedPolicy(sub_policy, recorder.clock),
                                     loop_config, hints=hints, task_id=task_id)
        traj["sample"] = sample
        return {"task_id": task_id, "recorder": recorder, "trajectory": traj}

    try:
        return list(await asyncio.gather(*(one(t, k) for t, k in jobs)))
    finally:
        await sub_policy.aclose()


def episode_end(cfg: GRPOConfig, traj: TrajectoryRecord, recorder: EpisodeRecorder) -> EpisodeEnd:
    return classify_episode(traj["outcome"], traj["stats"].get("wall_s", 0.0), recorder.cut, recorder.clock.policy_s(),
                            cfg.rlm.max_wall_s, episode_timeout_s(cfg))


def _collect(cfg: GRPOConfig, episodes: list[RolloutEpisode], tokenizer: Any, log: RolloutLog,
             step: int) -> dict[str, list | None]:
    out: dict[str, list] = {k: [] for k in (
        "prompt_ids", "completion_ids", "logprobs", "env_mask", "rlm_episode_id", "rlm_final", "rlm_outcome",
        "rlm_turns", "rlm_turns_with_code", "rlm_end", "rlm_length")}
    all_logprobs = True
    for ep in episodes:
        rec = ep["recorder"]
        traj = ep["trajectory"]
        prompt_ids = rec.prompt_ids
        completion_ids, env_mask, logprobs = list(rec.completion_ids), list(rec.env_mask), list(rec.logprobs)
        if prompt_ids is None:  # the episode broke before the model was asked anything
            prompt_ids = [tokenizer.pad_token_id]
        if not completion_ids:  # TRL needs at least one completion token; this one is never trained
            completion_ids, env_mask, logprobs = [tokenizer.pad_token_id], [0], [0.0]
        all_logprobs = all_logprobs and rec.has_logprobs
        end = episode_end(cfg, traj, rec)
        length = len(rec.completion_ids)
        model_tokens = sum(env_mask)
        if not is_scored(end, cfg.reward.overlong):
            env_mask = [0] * len(env_mask)  # not trained, and not counted in the loss's token normalization
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
        out["rlm_end"].append(end)
        out["rlm_length"].append(length)
        log.add(traj["id"], {**traj, "grpo_step": step, "model_tokens": model_tokens,
                             "env_tokens": length - model_tokens, "end": end, "trained": is_scored(end, cfg.reward.overlong),
                             "infra_error": end == "infra"})
    if not all_logprobs:
        return {**out, "logprobs": None}  # transformers backend: TRL recomputes what it needs
    return dict(out)
