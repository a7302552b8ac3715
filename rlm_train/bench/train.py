"""`bench_train()`: SFT and GRPO throughput on this CPU, as tokens/s and as achieved FLOP/s over this
CPU's fp32 matmul rate measured in the same run (goal: SFT >= 0.5 of it); SFT also against plain TRL.

- peak: torch.matmul of large square fp32 matrices on 1 thread and on all cores, best of a few,
  measured before and after the training (the higher is the denominator: a busy machine can only
  lower it); bf16 too, for reference (this CPU has no native bf16).
- SFT, ours: the real `run_sft` (fp32, LoRA r=16 on all linear layers, logits only at trained
  positions) on synthetic per-turn RLM samples, for each thread count; the first step is warm-up.
  FLOPs are counted per micro-batch from the tokens it holds (bench/flops.py says how).
- SFT, TRL defaults: `SFTTrainer` given the model path and a prompt/completion dataset with nothing
  changed but the batch size, LoRA, step count and use_cpu (TRL's default bf16 refuses a CPU without
  it): bf16 autocast, gradient checkpointing, padded batches (TRL 1.16's fused head also projects only
  the labelled positions).
- SFT, logits paths: ours again on demo-shaped samples (~360 prompt + ~90 trained tokens), its steps
  alternating with the standard loss (losses.full_logits_loss: logits at every position), so both see the
  same load; the ratio of their tokens/s is what computing logits only where the loss is buys.
- GRPO: the in-process path (bench/train_grpo.py), split per step into generation, REPL, scoring
  and training.

Tokens/s counts real (non-pad) tokens, prompt and answer, per second of training steps.

    rlm-train bench train [--quick] [--model gemma3-270m|DIR] [--json-out REPORT.json]

--quick: a tiny random Gemma-3-shaped model built here, one timed step of each, small matmuls, no
TRL baseline: checks the bench runs, measures nothing worth quoting.
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


def demo_shaped_samples(n: int = 8) -> list[dict]:
    """Per-turn samples shaped like the demo's SFT data (Gemma tokens: ~360 of prompt, ~90 trained)."""
    keys = ["quiet-harbor", "amber-field", "silver-creek", "north-gate"]
    out = []
    for i in range(n):
        key = keys[i % len(keys)]
        records = "\n".join(f"record {j:04d}: {key if j == 5 else 'stone-bridge'} value={(i * 7919 + j * 104729) % 100000}"
                            for j in range(10))
        out.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question: What is the special magic number for {key}? The context is a "
                                        f"str of {52000 + 137 * i} characters."},
            {"role": "assistant", "content": "```repl\nprint(len(context))\nprint(context[:600])\n```"},
            {"role": "user", "content": f"REPL output:\n{52000 + 137 * i}\nThe archive opens with notes on harbors, "
                                        f"fields and bridges, followed by a long list of numbered records.\n{records}"},
            {"role": "assistant", "content": (
                "```repl\nimport re\n"
                f"hits = [m.start() for m in re.finditer(r'{key}', context)]\n"
                "for h in hits[:3]:\n    print(context[max(0, h - 200): h + 200])\n"
                "answer = llm_query('The magic number? ' + context[hits[0]:hits[0] + 300])\nprint(answer)\n```")},
        ]})
    return out


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


class _StepTimer:
    """Records (time, CPU time of this process, tokens so far, FLOPs so far) at each optimizer step end."""

    def __init__(self, tokens_fn, flops_fn=lambda: 0.0):
        self.tokens_fn = tokens_fn
        self.flops_fn = flops_fn
        self.marks: list[tuple[float, float, int, float]] = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.marks.append((time.perf_counter(), time.process_time(), timer.tokens_fn(), timer.flops_fn()))

        return _CB()

    def rate(self) -> tuple[float, float, float, float]:
        """tokens/s, s/step, FLOP/s and FLOP per CPU second over all steps after the first (warm-up)."""
        (t0, c0, n0, f0), (t1, c1, n1, f1) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        return (n1 - n0) / (t1 - t0), (t1 - t0) / steps, (f1 - f0) / (t1 - t0), (f1 - f0) / max(c1 - c0, 1e-9)


def _ours(model_path: Path, data: Path, work: Path, threads: int, steps: int, batch_size: int,
          alternate: bool = False) -> dict:
    """The real run_sft, `steps` timed after one warm-up step. With `alternate`, its steps switch between our
    loss and the standard one (losses.full_logits_loss: logits at every position), one warm-up step of each,
    then `steps` timed steps of each: both see the same machine load; returns each one's rates."""
    import torch

    from rlm_train.bench.flops import lora_train_flops, model_shape, sample_lengths
    from rlm_train.config import build_config
    from rlm_train.train.losses import full_logits_loss
    from rlm_train.train.sft import SFTConfig, run_sft

    name = f"{'both-losses' if alternate else 'ours'}-{data.stem}-{threads}"
    cfg = build_config(SFTConfig, {
        "model": str(model_path), "dataset": str(data), "output_dir": str(work / name),
        "num_threads": threads, "device": "cpu", "dtype": "float32", "resume": "never",
        "lora": {"r": 16, "alpha": 32},
        "training": {"max_steps": 2 * steps + 2 if alternate else steps + 1, "batch_size": batch_size,
                     "save_steps": 10_000, "shuffle": False},
    })
    holder: dict[str, Any] = {"flops": 0.0}

    def hook(trainer):
        shape = holder["shape"] = model_shape(trainer.model)
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *args, **kwargs):
            # completion_loss computes logits at the trained positions; the standard path at every position
            every = trainer.loss_path is full_logits_loss
            logits = inputs["labels"].shape[1] if every else int((inputs["labels"][0, 1:] != -100).sum())
            lengths = sample_lengths(inputs["position_ids"])
            holder["flops"] += sum(lora_train_flops(shape, n, 0) for n in lengths) + lora_train_flops(shape, 0, logits)
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counted
        if alternate:
            trainer.add_callback(_alternating_losses(trainer))
        holder["timer"] = timer = _StepTimer(lambda: trainer.tokens_seen, lambda: holder["flops"])
        trainer.add_callback(timer.callback())

    run_sft(cfg, source="bench", quiet=True, on_trainer=hook)
    if alternate:
        return {path: {"threads": threads, **_step_rates(holder["timer"].marks, parity)}
                for path, parity in (("trained_only", 0), ("every_position", 1))}
    tps, sps, fps, fpc = holder["timer"].rate()
    _say(f"SFT {name}: {tps:.1f} tokens/s, {sps:.2f} s/step, {fps / 1e9:.1f} GFLOP/s")
    return {"threads": threads, "tokens_per_s": tps, "s_per_step": sps, "flop_per_s": fps, "flop_per_cpu_s": fpc,
            "torch_threads": torch.get_num_threads(), "shape": holder["shape"].described}


def _alternating_losses(trainer: Any) -> Any:
    """A callback that gives even steps our loss and odd steps the standard one."""
    from transformers import TrainerCallback

    from rlm_train.train.losses import completion_loss, full_logits_loss

    class _Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer.loss_path = full_logits_loss if state.global_step % 2 else completion_loss

    return _Alternate()


def _step_rates(marks: list[tuple[float, float, int, float]], parity: int) -> dict:
    """Rates over the steps of one parity from step 2 on (steps 0 and 1 warm each loss up); a step's time is
    from the previous step's end to its own."""
    steps = [k for k in range(2, len(marks)) if k % 2 == parity]
    wall, cpu, tokens, flops = (sum(marks[k][i] - marks[k - 1][i] for k in steps) for i in range(4))
    return {"steps_timed": len(steps), "tokens_per_s": tokens / wall, "s_per_step": wall / len(steps),
            "flop_per_s": flops / wall, "flop_per_cpu_s": flops / max(cpu, 1e-9),
            "tokens_per_cpu_s": tokens / max(cpu, 1e-9)}


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
    tps, sps, _, _ = timer.rate()
    print(f"[bench] TRL defaults{overrides or ''}, {threads} thread(s): {tps:.1f} tokens/s, {sps:.2f} s/step",
          file=sys.stderr, flush=True)
    return {"threads": threads, "tokens_per_s": tps, "s_per_step": sps, "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing}


def _logits_paths(model_path: Path, tokenizer: Any, work: Path, threads: int, steps: int, batch_size: int) -> dict:
    """SFT with logits only at the trained positions (ours) against the standard path (every position): one
    run on demo-shaped samples whose steps alternate between the two; `speedup` is the tokens/s ratio."""
    from rlm_train.train.sft_data import tokenize_sample

    samples = demo_shaped_samples(max(8, (steps + 1) * batch_size))
    data = work / "demo-shaped.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    labels = [tokenize_sample(tokenizer, s["messages"])[1] for s in samples]
    trained = sum(sum(t != -100 for t in y) for y in labels) / len(labels)
    shape = {"prompt_tokens_mean": sum(map(len, labels)) / len(labels) - trained, "trained_tokens_mean": trained}
    _say(f"SFT on demo-shaped samples ({shape['prompt_tokens_mean']:.0f} prompt + {trained:.0f} trained tokens), "
         f"{threads} thread(s), steps alternating logits at trained positions / at every position ...")
    rows = _ours(model_path, data, work, threads, steps, batch_size, alternate=True)
    kept, full = rows["trained_only"], rows["every_position"]
    return {**shape, "threads": threads, **rows, "speedup": kept["tokens_per_s"] / full["tokens_per_s"],
            "speedup_per_cpu_s": kept["tokens_per_cpu_s"] / full["tokens_per_cpu_s"]}


def _model_for(model: str | None, quick: bool, work: Path) -> tuple[Path, str]:
    """(model dir, what it is): the named model; with --quick and no model, a tiny random Gemma-3;
    gemma3-270m when it cannot be had on this machine falls back to the tiny one, said in the output."""
    from rlm_train.errors import UserError
    from rlm_train.models.loading import resolve_model
    from rlm_train.testing.tiny_models import build_tiny_gemma3

    if model is None and quick:
        return build_tiny_gemma3(work / "tiny-gemma3"), "tiny random Gemma-3-shaped model (stand-in, --quick)"
    name = model or "gemma3-270m"
    try:
        return resolve_model(name), name
    except UserError as exc:
        if model is not None:
            raise
        _say(f"gemma3-270m not available ({exc}); using a tiny random Gemma-3-shaped model instead")
        return build_tiny_gemma3(work / "tiny-gemma3"), "tiny random Gemma-3-shaped model (stand-in: gemma3-270m missing)"


def bench_train(model: str | None = None, quick: bool = False, steps: int = 3, grpo_steps: int = 1,
                baseline_steps: int = 1, batch_size: int = 1, threads: tuple[int, ...] | None = None) -> dict:
    """Measure the matmul peak, SFT (ours per thread count; TRL defaults unless quick) and GRPO in this
    process; print the table and return the report."""
    import torch

    from rlm_train.bench.flops import cpu_thread_counts, measure_peak
    from rlm_train.bench.train_grpo import bench_grpo
    from rlm_train.models.loading import load_tokenizer

    if quick:
        steps, grpo_steps = 1, 1
    threads = threads or tuple(cpu_thread_counts())
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="rlm-bench-train-") as tmp:
        work = Path(tmp)
        model_path, model_name = _model_for(model, quick, work)
        _say(f"model: {model_name} ({model_path})")
        _say("fp32/bf16 matmul rate, 1 thread and all cores ...")
        peak_before = measure_peak(quick)
        _say(f"fp32 matmul: {peak_before['fp32_best'] / 1e9:.1f} GFLOP/s")
        tokenizer = load_tokenizer(model_path)
        samples = bench_samples(max(8, (steps + 1) * batch_size))
        lengths = [len(tokenizer.apply_chat_template(s["messages"], tokenize=False)) for s in samples]
        data = work / "sft.jsonl"
        data.write_text("".join(json.dumps(s) + "\n" for s in samples))
        ours = []
        for t in threads:
            _say(f"SFT ours, {t} thread(s), {steps} timed step(s) after a warm-up ...")
            ours.append(_ours(model_path, data, work, t, steps, batch_size))
        best = max(ours, key=lambda r: r["tokens_per_s"])
        logits = _logits_paths(model_path, tokenizer, work, best["threads"], steps, batch_size)
        baseline = fp32 = None
        if not quick:
            _say(f"SFT TRL defaults, {baseline_steps} timed step(s) ...")
            baseline = _trl_defaults(model_path, load_tokenizer(model_path), samples, work, baseline_steps,
                                     batch_size, default_threads)
            fp32 = _trl_defaults(model_path, load_tokenizer(model_path), samples, work, baseline_steps, batch_size,
                                 best["threads"], bf16=False, gradient_checkpointing=False)
        _say(f"GRPO in-process, {best['threads']} thread(s), {grpo_steps} timed step(s) after a warm-up ...")
        grpo = bench_grpo(model_path, work, grpo_steps, best["threads"], quick)
        peak_after = measure_peak(quick)
    torch.set_num_threads(default_threads)
    peak = max(peak_before, peak_after, key=lambda p: p["fp32_best"])
    peak["fp32_per_cpu_s_best"] = max(peak_before["fp32_per_cpu_s_best"], peak_after["fp32_per_cpu_s_best"])
    report = _report(model_name, quick, batch_size, steps, lengths, peak, [peak_before, peak_after], ours, best,
                     baseline, fp32, grpo)
    report["logits_paths"] = logits
    for row in (logits["trained_only"], logits["every_position"]):
        row["fraction_of_peak"] = row["flop_per_s"] / report["cpu_fp32_flop_per_s"]
    _print_table(report)
    return report


def _report(model_name: str, quick: bool, batch_size: int, steps: int, lengths: list[int], peak: dict,
            peaks: list[dict], ours: list[dict], best: dict, baseline: dict | None, fp32: dict | None,
            grpo: dict) -> dict:
    rate, per_cpu = peak["fp32_best"], peak["fp32_per_cpu_s_best"]
    for row in ours:
        row["fraction_of_peak"] = row["flop_per_s"] / rate
        row["fraction_of_peak_per_cpu_s"] = row["flop_per_cpu_s"] / per_cpu
    g = grpo["mean"]
    for phase in ("generation", "training"):
        grpo[f"{phase}_fraction_of_peak"] = g[f"{phase}_flop_per_s"] / rate
        grpo[f"{phase}_fraction_of_peak_per_cpu_s"] = g[f"{phase}_flop_per_cpu_s"] / per_cpu
    report: dict[str, Any] = {
        "bench": "train", "model": model_name, "quick": quick, "batch_size": batch_size, "steps_timed": steps,
        "sample_chars_mean": sum(lengths) / len(lengths), "peak": peak,
        "peak_fp32_before_after": [p["fp32_best"] for p in peaks],
        "cpu_fp32_flop_per_s": rate, "cpu_fp32_flop_per_cpu_s": per_cpu, "ours": ours, "best_threads": best["threads"],
        "sft_tokens_per_s": best["tokens_per_s"], "sft_flop_per_s": best["flop_per_s"],
        "sft_fraction_of_peak": best["fraction_of_peak"], "sft_goal_met": best["fraction_of_peak"] >= 0.5,
        "sft_fraction_of_peak_per_cpu_s": best["fraction_of_peak_per_cpu_s"],
        "grpo": grpo,
    }
    if baseline is not None and fp32 is not None:
        report.update(trl_defaults=baseline, trl_tokens_per_s=baseline["tokens_per_s"],
                      speedup=best["tokens_per_s"] / baseline["tokens_per_s"], trl_fp32_no_ckpt=fp32,
                      speedup_vs_trl_fp32_no_ckpt=best["tokens_per_s"] / fp32["tokens_per_s"])
    return report


def _print_table(r: dict) -> None:
    peak, g, m = r["peak"], r["grpo"], r["grpo"]["mean"]

    def per_thread(rates: dict) -> str:
        return ", ".join(f"{t} thread(s) {v / 1e9:.1f}" for t, v in rates.items())

    print(f"train: {r['model']}, LoRA r=16, fp32{'  (--quick: a structure check, not a measurement)' if r['quick'] else ''}")
    print(f"  CPU fp32 matmul {peak['fp32_size']}^2, GFLOP/s: {per_thread(peak['fp32'])} (best {peak['fp32_best'] / 1e9:.1f}; "
          f"before/after the training {' / '.join(f'{v / 1e9:.1f}' for v in r['peak_fp32_before_after'])}); "
          f"per CPU second {r['cpu_fp32_flop_per_cpu_s'] / 1e9:.1f}")
    print(f"  CPU bf16 matmul {peak['bf16_size']}^2, GFLOP/s: {per_thread(peak['bf16'])} (reference only: no native bf16)")
    print(f"  {'':34}{'tokens/s':>10}{'GFLOP/s':>10}{'of peak':>9}{'per CPU s':>11}")
    rows = [(f"SFT ours, {row['threads']} thread(s)", row["tokens_per_s"], row["flop_per_s"],
             row["fraction_of_peak"], row["fraction_of_peak_per_cpu_s"]) for row in r["ours"]]
    rows += [(f"GRPO generation, {g['threads']} thread(s)", m["generation_tokens_per_s"], m["generation_flop_per_s"],
              g["generation_fraction_of_peak"], g["generation_fraction_of_peak_per_cpu_s"]),
             (f"GRPO training, {g['threads']} thread(s)", m["training_tokens_per_s"], m["training_flop_per_s"],
              g["training_fraction_of_peak"], g["training_fraction_of_peak_per_cpu_s"])]
    for name, tps, fps, frac, frac_cpu in rows:
        print(f"  {name:34}{tps:10.1f}{fps / 1e9:10.2f}{frac:9.3f}{frac_cpu:11.3f}")
    print(f"  SFT goal >= 0.5 of the fp32 matmul rate: {r['sft_fraction_of_peak']:.3f}  "
          f"{'ok' if r['sft_goal_met'] else 'MISSED'}  (per CPU second, which other load does not lower: "
          f"{r['sft_fraction_of_peak_per_cpu_s']:.3f})")
    lp = r["logits_paths"]
    print(f"  SFT on demo-shaped samples ({lp['prompt_tokens_mean']:.0f} prompt + {lp['trained_tokens_mean']:.0f} trained "
          f"tokens), {lp['threads']} thread(s), same run:")
    for label, row in (("logits at trained positions (ours)", lp["trained_only"]),
                       ("logits at every position (standard)", lp["every_position"])):
        print(f"    {label:36}{row['tokens_per_s']:8.1f} tokens/s{row['flop_per_s'] / 1e9:8.2f} GFLOP/s"
              f"{row['fraction_of_peak']:7.3f} of peak")
    print(f"    ratio (tokens/s): {lp['speedup']:.2f}x; per CPU second of this process {lp['speedup_per_cpu_s']:.2f}x")
    if "trl_defaults" in r:
        print(f"  SFT TRL defaults: {r['trl_tokens_per_s']:.2f} tokens/s -> ours {r['speedup']:.1f}x; TRL fp32 without "
              f"checkpointing {r['trl_fp32_no_ckpt']['tokens_per_s']:.1f} -> ours {r['speedup_vs_trl_fp32_no_ckpt']:.1f}x")
    print(f"  GRPO step, {g['episodes_per_step']} episodes, mean of {g['steps_timed']} step(s) after a warm-up: "
          f"{m['step_s']:.1f} s")
    print(f"    generation {m['generation_s']:7.2f} s  {m['prompt_tokens']:.0f} prompt + {m['generated_tokens']:.0f} "
          "generated tokens (in-process generate, the trainer's weights)")
    print(f"    repl       {m['repl_s']:7.2f} s  REPL cells, sandbox, episode orchestration (no generation running)")
    print(f"    scoring    {m['scoring_s']:7.2f} s  rewards {m['rewards_s']:.2f} s; the rest: the trainer's logprob "
          f"pass over {m['train_tokens']:.0f} tokens, advantages")
    print(f"    training   {m['training_s']:7.2f} s  forward + backward + optimizer over {m['train_tokens']:.0f} tokens")
