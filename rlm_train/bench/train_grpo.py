"""GRPO steps of the real in-process path (`run_grpo`, rollout.backend=transformers: the trainer's own
weights sample every root turn, episodes run in the sandbox), each step split into its phases:

    generation  the time the in-process generator is busy (prefill + decode of root turns)
    repl        the rest of the rollout's wall time: REPL cells, sandbox starts, episode orchestration
                (time when no generation batch is running)
    scoring     TRL's generate-and-score minus the rollout: reward functions (`rewards_s`, ours and
                TRL's calling), the trainer's no-grad logprob pass for the importance weights, advantages
    training    the rest of the optimizer step: forward + backward of the loss, optimizer

FLOPs as in bench/flops.py: generation as forward passes over prompt + generated tokens (logits only
at generated positions; padding of the batch not counted), training as LoRA forward + backward over
each episode's real tokens with logits at its completion positions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rlm_train.bench.flops import ModelShape, forward_flops, lora_train_flops, model_shape


class TimedBackend:
    """Wraps a generation backend: busy time, prompt and generated tokens, forward FLOPs."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.max_inflight = getattr(inner, "max_inflight", 1)
        self.shape: ModelShape | None = None
        self.busy_s = 0.0
        self.busy_cpu_s = 0.0  # this process's CPU time meanwhile (the event loop's share too: small)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.flops = 0.0

    def generate_batch(self, prompts: list[list[int]], sampling: Any) -> list[Any]:
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = self.inner.generate_batch(prompts, sampling)
        self.busy_s += time.perf_counter() - start
        self.busy_cpu_s += time.process_time() - start_cpu
        for prompt, out in zip(prompts, outs):
            self.prompt_tokens += len(prompt)
            self.generated_tokens += len(out.ids)
            if self.shape is not None:
                self.flops += forward_flops(self.shape, len(prompt) + len(out.ids), len(out.ids))
        return outs


class PhaseClock:
    """Per-step phase times, from wrappers the bench puts on the trainer (`install`)."""

    def __init__(self, backend: TimedBackend):
        self.backend = backend
        self.steps: list[dict] = []
        self.shape: ModelShape | None = None
        self._open: dict[str, float] = {}

    def _reset(self) -> None:
        b = self.backend
        self._open = {"step_start": time.perf_counter(), "step_cpu": time.process_time(), "rollout_s": 0.0,
                      "gen_score_s": 0.0, "gen_score_s_cpu": 0.0, "rewards_s": 0.0,
                      "busy0": b.busy_s, "busy_cpu0": b.busy_cpu_s, "prompt0": b.prompt_tokens, "gen0": b.generated_tokens, "flops0": b.flops,
                      "train_tokens": 0, "train_flops": 0.0}

    def _timed(self, key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._open[key] = self._open.get(key, 0.0) + time.perf_counter() - start
                self._open[key + "_cpu"] = self._open.get(key + "_cpu", 0.0) + time.process_time() - start_cpu
        return wrapper

    def install(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        self.shape = self.backend.shape = model_shape(trainer.model)
        trainer.rollout_func = self._timed("rollout_s", trainer.rollout_func)
        trainer._generate_and_score_completions = self._timed("gen_score_s", trainer._generate_and_score_completions)
        trainer._calculate_rewards = self._timed("rewards_s", trainer._calculate_rewards)
        clock = self

        class _Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._reset()

            def on_step_end(self, args, state, control, **kwargs):
                clock._close()

        trainer.add_callback(_Steps())
        self._reset()

    def on_batch(self, output: dict, extra: dict) -> None:
        """TRL's scored batch: the tokens the loss will run over (each row's real prompt + completion)."""
        assert self.shape is not None
        prompts = output["prompt_mask"].sum(dim=1).tolist()
        completions = output["completion_mask"].sum(dim=1).tolist()
        for p, c in zip(prompts, completions):
            self._open["train_tokens"] += int(p + c)
            self._open["train_flops"] += lora_train_flops(self.shape, int(p + c), int(c))

    def _close(self) -> None:
        o, b = self._open, self.backend
        step_s = time.perf_counter() - o["step_start"]
        training_cpu_s = time.process_time() - o["step_cpu"] - o["gen_score_s_cpu"]
        generation_s, generation_cpu_s = b.busy_s - o["busy0"], b.busy_cpu_s - o["busy_cpu0"]
        step = {
            "step_s": step_s, "generation_s": generation_s, "repl_s": max(o["rollout_s"] - generation_s, 0.0),
            "scoring_s": o["gen_score_s"] - o["rollout_s"], "rewards_s": o["rewards_s"],
            "training_s": step_s - o["gen_score_s"],
            "generated_tokens": b.generated_tokens - o["gen0"], "prompt_tokens": b.prompt_tokens - o["prompt0"],
            "generation_flops": b.flops - o["flops0"], "train_tokens": o["train_tokens"], "train_flops": o["train_flops"],
        }
        step["generation_tokens_per_s"] = step["generated_tokens"] / generation_s if generation_s > 0 else 0.0
        step["generation_flop_per_s"] = step["generation_flops"] / generation_s if generation_s > 0 else 0.0
        step["scoring_tokens_per_s"] = step["train_tokens"] / step["scoring_s"] if step["scoring_s"] > 0 else 0.0
        step["training_tokens_per_s"] = step["train_tokens"] / step["training_s"]
        step["training_flop_per_s"] = step["train_flops"] / step["training_s"]
        step["generation_flop_per_cpu_s"] = step["generation_flops"] / max(generation_cpu_s, 1e-9)
        step["training_flop_per_cpu_s"] = step["train_flops"] / max(training_cpu_s, 1e-9)
        self.steps.append(step)
        print(f"[bench] grpo step {len(self.steps)}: {step_s:.1f} s = generation {generation_s:.1f} + repl "
              f"{step['repl_s']:.1f} + scoring {step['scoring_s']:.1f} + training {step['training_s']:.1f}; "
              f"{step['generated_tokens']} generated, {step['train_tokens']} trained tokens", file=sys.stderr, flush=True)


def bench_grpo(model_path: Path, work: Path, steps: int, threads: int, quick: bool) -> dict:
    """`steps` GRPO steps (2 prompts x 2 episodes each) after one warm-up step; the per-step phases."""
    from rlm_train.config import build_config
    from rlm_train.models.loading import load_tokenizer
    from rlm_train.tasks import make_tasks
    from rlm_train.train.grpo import run_grpo
    from rlm_train.train.grpo_backends import default_backend_factory
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.grpo_setup import stop_token_ids

    tasks = work / "grpo-tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in make_tasks("niah", 2, 500 if quick else 1500, seed=7)))
    cfg = build_config(GRPOConfig, {
        "model": str(model_path), "prompts": str(tasks), "output_dir": str(work / "grpo"), "device": "cpu",
        "dtype": "float32", "num_threads": threads, "resume": "never", "lora": {"r": 16, "alpha": 32},
        "training": {"max_steps": steps + 1, "num_generations": 2, "batch_size": 4, "learning_rate": 1e-5,
                     "save_steps": 10_000, "drop_zero_advantage_groups": False},
        "rollout": {"backend": "transformers", "concurrency": 4, "sub_policy": "scripted"},
        "rlm": {"max_iterations": 2, "root_max_tokens": 16 if quick else 48, "temperature": 1.0,
                "prompt_style": "compact"},
    })
    tokenizer = load_tokenizer(model_path, chat_template=cfg.chat_template)
    timed = TimedBackend(None)

    def backend(trainer: Any) -> TimedBackend:
        timed.inner = default_backend_factory(cfg, tokenizer, stop_token_ids(tokenizer, model_path))(trainer)
        return timed

    clock = PhaseClock(timed)
    summary = run_grpo(cfg, "bench", backend_factory=backend, on_batch=clock.on_batch, on_trainer=clock.install)
    timed_steps = clock.steps[1:] or clock.steps
    mean = {key: sum(s[key] for s in timed_steps) / len(timed_steps) for key in timed_steps[0]}
    return {"steps": clock.steps, "steps_timed": len(timed_steps), "mean": mean, "threads": threads,
            "global_step": summary["global_step"], "episodes_per_step": cfg.training.batch_size,
            "shape": clock.shape.described if clock.shape else None}
