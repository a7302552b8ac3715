"""`bench_train()`: SFT tokens/s of Gemma-3-270m, our recipe vs plain TRL defaults, same run.

Both sides train the same LoRA (r=16, all linear layers) on the same synthetic per-turn
RLM samples for a few steps; the first step of each is warm-up and not timed.

- ours: fp32, logits only at trained positions, packed padding-free rows, measured for
  each thread count in `threads`; the fastest is reported (and is what CPU recipes use).
- TRL defaults: `SFTTrainer` given the model path and a prompt/completion dataset with
  nothing changed but the batch size, LoRA, step count and use_cpu (without it TRL's
  default bf16 refuses to start on a CPU) (so: bf16 autocast, gradient
  checkpointing, padded batches, torch's default threads, TRL's fused LM head, which on
  CPU still scores every position).

Tokens/s counts real (non-pad) tokens, prompt and answer, per second of training steps.

    rlm-train bench train [--json-out REPORT.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEM = (
    "You are a Recursive Language Model. Your input is NOT in this prompt: it sits in a Python REPL as the "
    "variable `context`. Write ```repl code blocks to inspect it: print slices, search with re, split it and "
    "call llm_query(prompt) or llm_query_batched(prompts) on the pieces, and aggregate the results. Only what "
    "you print comes back to you. When you know the answer, call FINAL with it."
)


def bench_samples(n: int = 8) -> list[dict]:
    """Per-turn samples shaped like real RLM turns (~250-350 Gemma tokens each)."""
    keys = ["quiet-harbor", "amber-field", "silver-creek", "north-gate", "red-maple", "stone-bridge", "blue-lake", "old-mill"]
    out = []
    for i in range(n):
        key = keys[i % len(keys)]
        out.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: What is the special magic number for {key}? The context is a "
                                        f"str of {52000 + 137 * i} characters."},
            {"role": "assistant", "content": "```repl\nprint(len(context))\nprint(context[:300])\n```"},
            {"role": "user", "content": f"REPL output:\n{52000 + 137 * i}\nThe archive opens with notes on harbors, "
                                        "fields and bridges, followed by a long list of numbered records."},
            {"role": "assistant", "content": (
                "```repl\nimport re\n"
                f"hits = [m.start() for m in re.finditer(r'{key}', context)]\nprint(len(hits), hits[:5])\n"
                "for h in hits[:3]:\n    print(context[max(0, h - 200): h + 200])\n```")},
        ]})
    return out


class _StepTimer:
    """Records (time, tokens so far) at each optimizer step end."""

    def __init__(self, tokens_fn):
        self.tokens_fn = tokens_fn
        self.marks: list[tuple[float, int]] = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.marks.append((time.perf_counter(), timer.tokens_fn()))

        return _CB()

    def rate(self) -> tuple[float, float]:
        """tokens/s and s/step over all steps after the first (warm-up)."""
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        return (n1 - n0) / (t1 - t0), (t1 - t0) / steps


def _ours(model_path: Path, data: Path, work: Path, threads: int, steps: int, batch_size: int) -> dict:
    import torch

    from rlm_train.config import build_config
    from rlm_train.train.sft import SFTConfig, run_sft

    cfg = build_config(SFTConfig, {
        "model": str(model_path), "dataset": str(data), "output_dir": str(work / f"ours-{threads}"),
        "num_threads": threads, "device": "cpu", "dtype": "float32", "resume": "never",
        "lora": {"r": 16, "alpha": 32},
        "training": {"max_steps": steps + 1, "batch_size": batch_size, "save_steps": 10_000, "shuffle": False},
    })
    holder: dict[str, Any] = {}

    def hook(trainer):
        holder["timer"] = timer = _StepTimer(lambda: trainer.tokens_seen)
        trainer.add_callback(timer.callback())

    run_sft(cfg, source="bench", quiet=True, on_trainer=hook)
    tps, sps = holder["timer"].rate()
    print(f"[bench] ours, {threads} thread(s): {tps:.1f} tokens/s, {sps:.2f} s/step", file=sys.stderr, flush=True)
    return {"threads": threads, "tokens_per_s": tps, "s_per_step": sps, "torch_threads": torch.get_num_threads()}


def _trl_defaults(model_path: Path, tokenizer: Any, samples: list[dict], work: Path, steps: int,
                  batch_size: int, threads: int, **overrides: Any) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    torch.set_num_threads(threads)
    ds = Dataset.from_list([{"prompt": s["messages"][:-1], "completion": s["messages"][-1:]} for s in samples])
    args = TRLSFTConfig(output_dir=str(work / "trl"), max_steps=steps + 1, per_device_train_batch_size=batch_size,
                        report_to="none", save_strategy="no", disable_tqdm=True,
                        use_cpu=not torch.cuda.is_available(),  # else TRL's default bf16 refuses to start on CPU
                        **overrides)
    trainer = SFTTrainer(model=str(model_path), args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    timer = _StepTimer(lambda: int(trainer._total_train_tokens))
    trainer.add_callback(timer.callback())
    trainer.train()
    tps, sps = timer.rate()
    print(f"[bench] TRL defaults{overrides or ''}, {threads} thread(s): {tps:.1f} tokens/s, {sps:.2f} s/step",
          file=sys.stderr, flush=True)
    return {"threads": threads, "tokens_per_s": tps, "s_per_step": sps, "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing}


def bench_train(model: str = "gemma3-270m", steps: int = 3, baseline_steps: int = 1, batch_size: int = 1,
                threads: tuple[int, ...] = (1, 2), ablation: bool = True) -> dict:
    """Measure ours (each thread count) and TRL defaults in this process; return the report.

    `ablation=True` also times TRL with fp32 and no gradient checkpointing, which isolates what
    our loss (logits only at trained positions) and packing add beyond the dtype."""
    import torch

    from rlm_train.models.loading import load_tokenizer, resolve_model

    default_threads = torch.get_num_threads()
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)
    samples = bench_samples(max(8, (steps + 1) * batch_size))
    lengths = [len(tokenizer.apply_chat_template(s["messages"], tokenize=False)) for s in samples]
    with tempfile.TemporaryDirectory(prefix="rlm-bench-train-") as tmp:
        work = Path(tmp)
        data = work / "sft.jsonl"
        data.write_text("".join(json.dumps(s) + "\n" for s in samples))
        ours = [_ours(model_path, data, work, t, steps, batch_size) for t in threads]
        baseline = _trl_defaults(model_path, load_tokenizer(model_path), samples, work, baseline_steps,
                                 batch_size, default_threads)
        fp32 = (_trl_defaults(model_path, load_tokenizer(model_path), samples, work, baseline_steps, batch_size,
                              best_threads(ours), bf16=False, gradient_checkpointing=False) if ablation else None)
    torch.set_num_threads(default_threads)
    best = max(ours, key=lambda r: r["tokens_per_s"])
    report = {
        "bench": "train", "model": model, "batch_size": batch_size, "steps_timed": steps,
        "baseline_steps_timed": baseline_steps, "sample_chars_mean": sum(lengths) / len(lengths),
        "ours": ours, "best_threads": best["threads"], "ours_tokens_per_s": best["tokens_per_s"],
        "trl_defaults": baseline, "trl_tokens_per_s": baseline["tokens_per_s"],
        "speedup": best["tokens_per_s"] / baseline["tokens_per_s"],
    }
    if fp32 is not None:
        report["trl_fp32_no_ckpt"] = fp32
        report["speedup_vs_trl_fp32_no_ckpt"] = best["tokens_per_s"] / fp32["tokens_per_s"]
    print(f"train: SFT of {model}, LoRA r=16, batch {batch_size}, ~{report['sample_chars_mean']:.0f}-char samples")
    for row in ours:
        print(f"    ours, {row['threads']} thread(s): {row['tokens_per_s']:.1f} tokens/s ({row['s_per_step']:.2f} s/step)")
    print(f"    TRL defaults: {baseline['tokens_per_s']:.2f} tokens/s ({baseline['s_per_step']:.1f} s/step)")
    print(f"    speedup {report['speedup']:.1f}x   goal >= 2x  {'ok' if report['speedup'] >= 2 else 'MISSED'}")
    if fp32 is not None:
        print(f"    TRL in fp32 without gradient checkpointing: {fp32['tokens_per_s']:.1f} tokens/s "
              f"-> ours is {report['speedup_vs_trl_fp32_no_ckpt']:.1f}x that (loss at trained positions + packing)")
    return report


def best_threads(ours: list[dict]) -> int:
    return max(ours, key=lambda r: r["tokens_per_s"])["threads"]
