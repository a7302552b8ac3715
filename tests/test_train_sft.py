"""SFT on a tiny random Qwen3-shaped model: the loss mask, the fast loss, learning, saving,
loading back through HFPolicy, resume, full fine-tuning, recipes and bad input.

TRL/PEFT import once per process (~10 s): every training test shares one module fixture.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.config import load_config
from rlm_train.errors import UserError
from rlm_train.train.sft import (PackedCollator, SFTConfig, build_train_dataset, completion_loss, read_sft_dataset,
                                 run_sft, tokenize_sample)

sys.path.insert(0, str(Path(__file__).parent))
from rlm_train.testing.tiny_models import build_tiny_qwen3, rlm_sample, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu-sft.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model = build_tiny_qwen3(root / "model")
    # Two samples, batch 2: every step sees the same (repeated) batch.
    data = write_jsonl(root / "sft.jsonl", [rlm_sample(0), rlm_sample(1)])
    return {"root": root, "model": model, "data": data}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from rlm_train.models.loading import load_tokenizer

    return load_tokenizer(tiny["model"])


def tiny_config(tiny, out: str, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, TINY_RECIPE, [f"model={tiny['model']}", f"dataset={tiny['data']}",
                                                f"output_dir={tiny['root'] / out}", *overrides])


# ---------------------------------------------------------------------------
# The loss mask and the fast loss (no TRL import)


def test_loss_mask_is_exactly_the_last_assistant_turn(tokenizer):
    messages = rlm_sample(3)["messages"]
    ids, labels = tokenize_sample(tokenizer, messages)
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    answer_ids = tokenizer(messages[-1]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len(labels) == n_prompt + len(answer_ids)
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        if i < n_prompt:
            assert lab == -100, f"prompt token {i} ({tokenizer.decode([tok])!r}) is trained"
        else:
            assert lab == tok == answer_ids[i - n_prompt], f"answer token {i} not trained as itself"
    # The earlier assistant turn is context, not trained; the end-of-turn token is trained.
    trained_text = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained_text == messages[-1]["content"] + "<|im_end|>\n"
    assert messages[2]["content"] not in trained_text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in [lab for lab in labels if lab != -100]


def test_packed_rows_and_fast_loss_match_the_plain_loss(tiny, tokenizer):
    """Packing two samples in one row + logits only at trained positions == per-sample full-logit CE."""
    import torch
    import torch.nn.functional as F

    from rlm_train.models.loading import load_causal_lm

    ds, stats = build_train_dataset(tokenizer, [rlm_sample(0)["messages"], rlm_sample(5)["messages"]], 1024)
    batch = PackedCollator()([ds[0], ds[1]])
    n0 = len(ds[0]["input_ids"])
    assert batch["input_ids"].shape == (1, stats["tokens"])
    assert batch["position_ids"][0, n0].item() == 0 and batch["position_ids"][0, n0 - 1].item() == n0 - 1
    model = load_causal_lm(tiny["model"])
    with torch.no_grad():
        fast, info = completion_loss(model, batch)
        sums, count = 0.0, 0
        for row in (ds[0], ds[1]):  # reference: separate forward passes, full logits, HF-style shift
            x, y = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(input_ids=x).logits[0, :-1]
            sums += F.cross_entropy(logits, y[1:], ignore_index=-100, reduction="sum").item()
            count += int((y[1:] != -100).sum())
    assert info["trained"] == count == stats["trained_tokens"]
    assert fast.item() == pytest.approx(sums / count, rel=1e-4)


# ---------------------------------------------------------------------------
# Bad input (fails before any model is loaded)


def test_dataset_without_assistant_turns(tmp_path, tiny, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "task_id": "t"}])
    with pytest.raises(UserError, match="sample 0: no assistant turn"):
        read_sft_dataset(bad)
    code = cli.main(["sft", "--recipe", str(TINY_RECIPE), f"model={tiny['model']}", f"dataset={bad}",
                     f"output_dir={tmp_path / 'out'}"])
    assert code == 2 and "no assistant turn" in capsys.readouterr().err
    last_user = write_jsonl(tmp_path / "u.jsonl", [{"messages": rlm_sample(0)["messages"][:-1]}])
    with pytest.raises(UserError, match="last message is 'user'"):
        read_sft_dataset(last_user)


def test_dataset_from_save_to_disk(tmp_path):
    from datasets import Dataset

    Dataset.from_list([rlm_sample(0), rlm_sample(1)]).save_to_disk(str(tmp_path / "ds"))
    rows = read_sft_dataset(tmp_path / "ds")
    assert len(rows) == 2 and rows[0][-1]["role"] == "assistant"
    with pytest.raises(UserError, match="not found"):
        read_sft_dataset(tmp_path / "missing")


def test_recipe_needing_a_gpu_stops_at_once(tiny):
    cfg = tiny_config(tiny, "gpu", "device=cuda", "requires.gpus=8")
    with pytest.raises(UserError, match="needs 8 CUDA GPU"):
        run_sft(cfg)


def test_unknown_key_in_recipe(tiny):
    with pytest.raises(UserError, match="unknown key 'training.lr'"):
        tiny_config(tiny, "x", "training.lr=1")


# ---------------------------------------------------------------------------
# Recipes and Slurm templates


def sft_recipes() -> list[Path]:
    return [p for p in sorted((REPO / "recipes").glob("*.yaml"))
            if " sft " in p.read_text().splitlines()[0] or "slurm/sft-" in p.read_text().splitlines()[0]]


def test_every_sft_recipe_loads_and_dry_runs(capsys):
    recipes = sft_recipes()
    names = {p.name for p in recipes}
    assert {"tiny-cpu-sft.yaml", "gemma3-270m-cpu-sft.yaml", "qwen3-8b-sft-lora.yaml", "qwen3-8b-sft-full.yaml"} <= names
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"recipes/{path.name}" in first, f"{path}: first line must be its command"
        assert cli.main(["sft", "--recipe", str(path), "--dry-run"]) == 0, path
        out = capsys.readouterr().out
        assert "sft plan" in out
        cfg = load_config(SFTConfig, path)
        if cfg.launch.accelerate_config:
            assert (REPO / cfg.launch.accelerate_config).is_file()
            assert "--config_file" in out


# ---------------------------------------------------------------------------
# Training (one LoRA run shared by the tests below)


@pytest.fixture(scope="module")
def lora_run(tiny):
    import torch

    from transformers import TrainerCallback

    cfg = tiny_config(tiny, "lora", "merged_dtype=float32", "training.max_steps=12")
    before: dict = {}
    after: dict = {}

    class AfterTraining(TrainerCallback):  # before save_merged folds the LoRA into the base
        def on_train_end(self, args, state, control, model=None, **kwargs):
            after.update({n: p.detach().clone() for n, p in model.named_parameters()})

    def snapshot(trainer):
        before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        trainer.add_callback(AfterTraining())

    summary = run_sft(cfg, source=str(TINY_RECIPE), on_trainer=snapshot)
    torch.set_num_threads(1)
    return {"cfg": cfg, "summary": summary, "before": before, "after": after}


@pytest.mark.slow
def test_lora_loss_falls_on_a_repeated_batch(lora_run):
    losses = lora_run["summary"]["losses"]
    print("tiny LoRA loss curve:", [round(x, 3) for x in losses])
    assert len(losses) == 12
    assert losses[-1] < 0.9 * losses[0], losses  # measured 5.98 -> 5.06
    assert sum(losses[-3:]) < sum(losses[:3]) and min(losses) == pytest.approx(losses[-1], rel=0.02), losses
    metrics = [json.loads(line) for line in (Path(lora_run["cfg"].output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 for m in metrics if "loss" in m)


@pytest.mark.slow
def test_lora_weights_change_and_base_weights_do_not(lora_run):
    before, after = lora_run["before"], lora_run["after"]
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(not after[n].equal(before[n]) for n in lora if "lora_B" in n)  # B starts at zero
    assert sum(not after[n].equal(before[n]) for n in lora) == len(lora)
    assert all(after[n].equal(before[n]) for n in base)


@pytest.mark.slow
def test_saved_adapter_loads_back_and_generates(lora_run, tiny):
    import torch

    from rlm_train.models.base import SamplingParams
    from rlm_train.models.loading import load_causal_lm
    from rlm_train.policies.spec import build_policy

    out = Path(lora_run["cfg"].output_dir)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "rlm_train_adapter.json").is_file()
    assert (adapter / "chat_template.jinja").is_file()
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-12").is_dir()

    policy = build_policy(f"hf:{tiny['model']}+adapter:{adapter}")
    messages = rlm_sample(0)["messages"][:-1]
    done = asyncio.run(policy.chat(messages, SamplingParams(max_tokens=12)))
    assert done.completion_tokens > 0 and isinstance(done.text, str) and done.prompt_tokens > 100
    assert done.finish_reason in ("stop", "length")
    seeded = [asyncio.run(policy.chat(messages, SamplingParams(max_tokens=8, temperature=1.0, seed=3))) for _ in range(2)]
    assert seeded[0].text == seeded[1].text  # a seed makes sampling reproducible
    if len(done.text) >= 4:  # greedy is deterministic: a stop string cuts the same text at its first occurrence
        stop = done.text[2:4]
        cut = asyncio.run(policy.chat(messages, SamplingParams(max_tokens=12, stop=[stop])))
        assert cut.text == done.text[:done.text.find(stop)] and cut.finish_reason == "stop"

    # The adapter (base + LoRA) and the merged model compute the same function; the base alone does not.
    ids = torch.tensor([tokenize_sample(policy.tokenizer, rlm_sample(0)["messages"])[0]])
    merged = load_causal_lm(out / "merged")
    base = load_causal_lm(tiny["model"])
    with torch.no_grad():
        la, lm, lb = (m(input_ids=ids).logits for m in (policy.model, merged, base))
    assert torch.allclose(la, lm, atol=1e-4)
    assert not torch.allclose(la, lb, atol=1e-3)
    asyncio.run(policy.aclose())


@pytest.mark.slow
def test_adapter_for_a_different_base_model(lora_run, tiny):
    import shutil

    from rlm_train.models.hf import HFPolicy

    other = build_tiny_qwen3(tiny["root"] / "other", hidden_size=96)
    adapter = Path(lora_run["cfg"].output_dir) / "adapter"
    with pytest.raises(UserError, match="different base model.*hidden_size: adapter 64 vs model 96"):
        HFPolicy(str(other), adapter=str(adapter))
    # Without our metadata (an adapter from elsewhere), PEFT's shape mismatch becomes the same kind of error.
    bare = tiny["root"] / "bare-adapter"
    shutil.copytree(adapter, bare)
    (bare / "rlm_train_adapter.json").unlink()
    with pytest.raises(UserError, match="does not fit base model"):
        HFPolicy(str(other), adapter=str(bare))


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(lora_run, tiny):
    cfg = tiny_config(tiny, "lora", "training.max_steps=14", "save_merged=false")
    summary = run_sft(cfg, quiet=True)
    assert summary["resumed_from"].endswith("checkpoint-12")
    assert summary["global_step"] == 14


@pytest.mark.slow
def test_full_fine_tuning_changes_all_weights(tiny):
    cfg = tiny_config(tiny, "full", "lora.enabled=false", "save_merged=false", "training.max_steps=4",
                      "training.learning_rate=1e-3")
    before: dict = {}
    summary = run_sft(cfg, quiet=True, on_trainer=lambda t: before.update(
        {"t": t, **{n: p.detach().clone() for n, p in t.model.named_parameters()}}))
    trainer = before.pop("t")
    changed = [not p.detach().equal(before[n]) for n, p in trainer.model.named_parameters()]
    assert all(changed)
    assert summary["losses"][-1] < summary["losses"][0]
    assert (Path(summary["model_dir"]) / "config.json").is_file()
    assert (Path(summary["model_dir"]) / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_cli_trains_the_tiny_recipe(tiny, capsys):
    out = tiny["root"] / "cli"
    code = cli.main(["sft", "--recipe", str(TINY_RECIPE), f"model={tiny['model']}", f"dataset={tiny['data']}",
                     f"output_dir={out}", "training.max_steps=3", "save_merged=false", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sft plan" in printed and '"global_step": 3' in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3
