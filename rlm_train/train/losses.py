"""The SFT loss: cross-entropy on the trained tokens only, with the logits computed only at those
positions and their fp32 cross-entropy taken in chunks, so memory stays bounded however many
tokens a step trains (10k trained tokens x a 152k vocabulary is ~6 GB of fp32 logits at once)."""

from __future__ import annotations

from typing import Any

LOSS_CHUNK_TOKENS = 1024
"""Trained positions per fp32 cross-entropy chunk: 1024 x 262k vocabulary = 1 GiB of fp32 at most."""


def chunked_cross_entropy(logits: Any, target: Any, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[Any, int]:
    """(sum of fp32 cross-entropy over the rows of `logits` [N, V], correct argmax count).

    Each chunk is cast to fp32 inside a checkpoint: its fp32 copy and softmax are freed right after
    the forward and recomputed one chunk at a time in backward, so the loss never holds more than
    one chunk's fp32 logits (on top of the model's own logits, in the model's dtype)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    total = logits.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], chunk_tokens):
        part, part_target = logits[start:start + chunk_tokens], target[start:start + chunk_tokens]
        if part.requires_grad:
            total = total + checkpoint(_chunk_loss, part, part_target, use_reentrant=False)
        else:
            total = total + _chunk_loss(part, part_target)
        with torch.no_grad():
            correct += (part.argmax(-1) == part_target).sum()
    return total, int(correct.item())


def _chunk_loss(part: Any, target: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(part.float(), target, reduction="sum")


def completion_loss(model: Any, inputs: dict, num_items: Any = None,
                    chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[Any, dict]:
    """Summed cross-entropy over trained tokens / num_items, computing logits ONLY at those positions.

    Position i predicts token i+1, so the kept indices are those whose NEXT label is trained.
    The model applies its own output head (and any final logit softcapping) to just these rows.
    """
    import torch

    labels = inputs["labels"]
    if labels.shape[0] != 1:
        raise ValueError("completion_loss expects one packed row (PackedCollator)")
    targets = labels[0, 1:]
    keep = (targets != -100).nonzero().squeeze(-1)
    out = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                logits_to_keep=keep, use_cache=False)
    loss_sum, correct = chunked_cross_entropy(out.logits[0], targets[keep], chunk_tokens)
    denom = num_items if num_items is not None else max(len(keep), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom, {"correct": correct, "trained": len(keep), "tokens": inputs["input_ids"].shape[1]}
