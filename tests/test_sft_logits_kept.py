"""SFT's loss computes logits only at trained positions (losses.completion_loss). It must equal the
standard path (the model's own loss from logits at every position, losses.full_logits_loss) in value
and in LoRA gradients, on tiny random Gemma-3- and Qwen3-shaped models, for the packed rows the SFT
collator builds and for padded rows, with and without gradient accumulation; and a CLI run with
gradient accumulation still trains, logs TRL's token metrics and saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.testing.tiny_models import build_tiny_gemma3, build_tiny_qwen3, rlm_sample, write_jsonl
from rlm_train.train.losses import completion_loss, full_logits_loss

REPO = Path(__file__).resolve().parents[1]
BUILDERS = {"gemma3": build_tiny_gemma3, "qwen3": build_tiny_qwen3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def lora_model(request, tmp_path_factory):
    """(LoRA model on every linear layer, with nonzero B so the adapters change the logits; its two batches)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlm_train.models.loading import load_causal_lm, load_tokenizer
    from rlm_train.train.sft_data import PackedCollator, build_train_dataset

    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    tokenizer = load_tokenizer(path)
    base = load_causal_lm(path)
    if request.param == "gemma3":
        base.config.final_logit_softcapping = 30.0  # Gemma-2/3 configs may set it; the kept path must apply it
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ds, _ = build_train_dataset(tokenizer, [rlm_sample(i)["messages"] for i in range(4)], 1024)
    packed = PackedCollator()([ds[0], ds[1]])
    return model, packed, padded_batch([ds[2], ds[3]], tokenizer.pad_token_id)


def padded_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-padded rows with an attention mask; pads are never trained."""
    import torch

    width = max(len(r["input_ids"]) + 5 for r in rows)  # at least 5 pads on every row
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trained_items(batches: list[dict]) -> int:
    """num_items_in_batch as transformers' Trainer counts it: labels[..., 1:] that are not -100."""
    return sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches)


def lora_grads(model, loss_path, batches: list[dict], num_items) -> tuple[list[float], dict]:
    """Each micro-batch's loss and the LoRA gradients accumulated over them (as the Trainer accumulates)."""
    model.zero_grad()
    losses, infos = [], []
    for batch in batches:
        loss, info = loss_path(model, batch, num_items)
        loss.backward()
        losses.append(loss.item())
        infos.append(info)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return losses, {"grads": grads, "infos": infos}


def assert_same(model, batches: list[dict], num_items) -> None:
    import torch

    ours, ours_out = lora_grads(model, completion_loss, batches, num_items)
    ref, ref_out = lora_grads(model, full_logits_loss, batches, num_items)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert set(ours_out["grads"]) == set(ref_out["grads"]) and len(ours_out["grads"]) > 0
    worst = max(float((ours_out["grads"][n] - g).abs().max()) for n, g in ref_out["grads"].items())
    scale = max(float(g.abs().max()) for g in ref_out["grads"].values())
    assert scale > 1e-4 and worst <= 1e-5 * max(scale, 1.0), (worst, scale)
    for mine, theirs in zip(ours_out["infos"], ref_out["infos"]):
        assert mine["trained"] == theirs["trained"] > 0 and mine["correct"] == theirs["correct"]
        assert mine["tokens"] == theirs["tokens"]
        assert mine["entropy"] == pytest.approx(theirs["entropy"], rel=1e-5)
    assert all(torch.isfinite(g).all() for g in ours_out["grads"].values())


@pytest.mark.parametrize("which", ["packed", "padded"])
def test_loss_and_lora_gradients_equal_the_full_logits_path(lora_model, which):
    model, packed, padded = lora_model
    batch = packed if which == "packed" else padded
    if which == "padded":
        assert (batch["attention_mask"] == 0).any() and (batch["labels"][:, 1:] == -100).float().mean() > 0.5
    assert_same(model, [batch], None)  # no accumulation: mean over this batch's trained tokens


def test_gradient_accumulation_equals_the_full_logits_path(lora_model):
    """Two micro-batches of one optimizer step, each divided by the step's trained-token count."""
    model, packed, padded = lora_model
    batches = [packed, padded]
    import torch

    assert_same(model, batches, torch.tensor(trained_items(batches)))


def test_a_model_that_ignores_logits_to_keep_falls_back_to_gathering(lora_model):
    """The fallback: a forward that returns every position's logits is gathered, with one warning."""
    model, packed, _ = lora_model

    class KeepsEverything:
        def __call__(self, logits_to_keep=None, **kwargs):
            return model(**kwargs)

    with pytest.warns(UserWarning, match="ignores logits_to_keep"):
        loss, info = completion_loss(KeepsEverything(), packed)
    expected, _ = full_logits_loss(model, packed)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_cli_run_with_gradient_accumulation_trains_and_saves(tmp_path):
    model = build_tiny_gemma3(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [rlm_sample(i) for i in range(4)])
    out = tmp_path / "out"
    code = cli.main(["sft", "--recipe", str(REPO / "recipes" / "tiny-cpu-sft.yaml"), f"model={model}",
                     f"dataset={data}", f"output_dir={out}", "training.max_steps=6", "training.batch_size=1",
                     "training.gradient_accumulation_steps=2", "save_merged=false"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert len(logged) >= 5
    assert logged[-1]["loss"] < logged[0]["loss"]
    for row in logged:
        assert 0 <= row["mean_token_accuracy"] <= 1 and row["entropy"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
