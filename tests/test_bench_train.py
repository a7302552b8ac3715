"""`rlm-train bench train`: the FLOP counting it divides by, and its --quick run end to end on a tiny
random Gemma-3-shaped model (structure and ranges only: speed goals live in the bench, never in tests)."""

from __future__ import annotations

import json
import subprocess

import pytest


def test_flop_count_matches_the_model_shape(tmp_path):
    """The counted parameters are the model's own, and the LoRA training count is 4 N + 6 N_lora per token,
    3 x causal attention, 4 d V per computed logit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlm_train.bench.flops import (
        attended_keys,
        forward_flops,
        lora_train_flops,
        model_shape,
        sample_lengths,
    )
    from rlm_train.testing.tiny_models import build_tiny_gemma3

    model = AutoModelForCausalLM.from_pretrained(build_tiny_gemma3(tmp_path / "m"))
    c = model.config
    per_layer = c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) \
        + 3 * c.hidden_size * c.intermediate_size
    base = model_shape(model)
    assert base.linear_params == c.num_hidden_layers * per_layer and base.lora_params == 0
    assert base.head_params == c.hidden_size * c.vocab_size

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    shape = model_shape(peft)
    assert shape.linear_params == base.linear_params and shape.head_params == base.head_params
    assert shape.lora_params == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)

    assert attended_keys(4, None) == 1 + 2 + 3 + 4 and attended_keys(5, 2) == 1 + 2 + 2 + 2 + 2
    length, logits = 10, 3
    attention = sum(4 * attended_keys(length, w) * shape.query_width for w in shape.layer_windows)
    assert lora_train_flops(shape, length, logits) == pytest.approx(
        (4 * shape.linear_params + 6 * shape.lora_params) * length + 3 * attention + 4 * shape.head_params * logits)
    assert forward_flops(shape, length, logits) == pytest.approx(
        2 * (shape.linear_params + shape.lora_params) * length + attention + 2 * shape.head_params * logits)

    import torch

    assert sample_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [3, 2, 4]


@pytest.mark.slow
def test_bench_train_quick_reports_fractions_of_the_measured_peak(rlm_cli, tmp_path):
    out = tmp_path / "train.json"
    run = subprocess.run([*rlm_cli, "bench", "train", "--quick", "--json-out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and "tiny random" in report["model"]

    peak = report["peak"]
    assert peak["fp32_best"] == max(peak["fp32"].values()) > 0 and peak["bf16_best"] > 0
    assert report["cpu_fp32_flop_per_s"] == max(report["peak_fp32_before_after"])
    for row in report["ours"]:
        assert row["tokens_per_s"] > 0
        assert row["fraction_of_peak"] == pytest.approx(row["flop_per_s"] / report["cpu_fp32_flop_per_s"])
        assert 0 < row["fraction_of_peak"] <= 1 and 0 < row["fraction_of_peak_per_cpu_s"] <= 1
    assert report["sft_fraction_of_peak"] == max(r["fraction_of_peak"] for r in report["ours"]
                                                 if r["threads"] == report["best_threads"])

    paths = report["logits_paths"]  # the same samples, logits at trained positions vs at every position
    kept, full = paths["trained_only"], paths["every_position"]
    assert paths["trained_tokens_mean"] < paths["prompt_tokens_mean"]
    assert paths["speedup"] == pytest.approx(kept["tokens_per_s"] / full["tokens_per_s"])
    assert 0 < kept["fraction_of_peak"] <= 1 and 0 < full["fraction_of_peak"] <= 1

    grpo = report["grpo"]
    assert grpo["global_step"] == 2 and len(grpo["steps"]) == 2  # one warm-up step, one timed
    for step in grpo["steps"]:
        phases = step["generation_s"] + step["repl_s"] + step["scoring_s"] + step["training_s"]
        assert step["step_s"] == pytest.approx(phases, rel=0.02, abs=0.02)
        assert min(step["generation_s"], step["scoring_s"], step["training_s"]) > 0
        assert step["generated_tokens"] > 0 and step["train_tokens"] > step["generated_tokens"]
    for phase in ("generation", "training"):
        assert 0 < grpo[f"{phase}_fraction_of_peak"] <= 1 and 0 < grpo[f"{phase}_fraction_of_peak_per_cpu_s"] <= 1

    table = run.stdout
    assert "of peak" in table and "per CPU s" in table and "SFT ours, 1 thread(s)" in table
    for phase in ("generation", "repl", "scoring", "training"):
        assert f"    {phase} " in table
    assert "[bench] SFT ours" in run.stderr and "[bench] grpo step 1" in run.stderr  # progress while it runs


def test_quick_is_refused_by_other_benches(rlm_cli):
    run = subprocess.run([*rlm_cli, "bench", "tasks", "--quick"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith("--quick: only `bench train` takes it, not `bench tasks`")
