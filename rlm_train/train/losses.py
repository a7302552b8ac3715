"""Loss pieces. SFT: cross-entropy on the trained tokens only, with the logits computed only at those
positions and their fp32 cross-entropy taken in chunks, so memory stays bounded however many
tokens a step trains (10k trained tokens x a 152k vocabulary is ~6 GB of fp32 logits at once).
GRPO: which groups carry a learning signal, and the importance weights that correct for the sampler
(vLLM or in-process generate) scoring tokens differently from the trainer. Pure tensor functions;
the GRPO trainer (train/grpo.py) applies them to TRL's batch."""

from __future__ import annotations

from typing import Any, Literal

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


# ---------------------------------------------------------------------------
# GRPO

ZERO_ADVANTAGE = 1e-6
"""An advantage this small is no signal: what a group of equal rewards leaves after float rounding."""

ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def zero_advantage_groups(advantages: Any, group_size: int) -> Any:
    """Bool [groups]: the groups (consecutive `group_size` episodes of one prompt) in which every episode's
    advantage is 0: equal rewards, or at most one episode scored. They push the policy nowhere."""
    return (advantages.reshape(-1, group_size).abs() <= ZERO_ADVANTAGE).all(dim=1)


def importance_weights(trainer_logps: Any, sampler_logps: Any, mask: Any, mode: ImportanceSamplingMode,
                       clip_min: float | None, clip_max: float | None) -> tuple[Any, Any]:
    """(weights, bounded) for the sampled tokens [B, T]: the ratio p_trainer / p_sampler of each token
    (token_* modes) or of the whole episode (sequence_* modes: one [B, 1] ratio, the product over its
    tokens), clipped into [clip_min, clip_max] (*_truncate) or set to 0 outside it (*_mask), as TRL
    defines the modes. Tokens outside `mask` (REPL feedback, padding) and tokens the sampler gave no
    logprob (NaN) get ratio 1. `bounded` marks the ratios the bounds changed."""
    import torch

    diff = torch.nan_to_num((trainer_logps - sampler_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = diff.exp()
    low = -float("inf") if clip_min is None else clip_min
    high = float("inf") if clip_max is None else clip_max
    bounded = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=clip_min, max=clip_max)
    else:
        weights = ratio.masked_fill(bounded, 0.0)
    return weights, bounded
