"""Loss pieces. SFT: cross-entropy on the trained tokens only, with the logits computed only at those
positions (most of a sample is prompt, and the output head costs more per position than the decoder
body on a 262k vocabulary) and their fp32 cross-entropy taken in chunks, so memory stays bounded
however many tokens a step trains (10k trained tokens x a 152k vocabulary is ~6 GB of fp32 logits).
GRPO: which groups carry a learning signal, and the importance weights that correct for the sampler
(vLLM or in-process generate) scoring tokens differently from the trainer. Pure tensor functions;
the GRPO trainer (train/grpo.py) applies them to TRL's batch."""

from __future__ import annotations

from typing import Any, Literal

LOSS_CHUNK_TOKENS = 1024
"""Trained positions per fp32 cross-entropy chunk: 1024 x 262k vocabulary = 1 GiB of fp32 at most."""


def chunked_cross_entropy(logits: Any, target: Any, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[Any, int, float]:
    """(sum of fp32 cross-entropy over the rows of `logits` [N, V], correct argmax count, summed entropy).

    Each chunk is cast to fp32 inside a checkpoint: its fp32 copy and softmax are freed right after
    the forward and recomputed one chunk at a time in backward, so the loss never holds more than
    one chunk's fp32 logits (on top of the model's own logits, in the model's dtype). The entropy of
    each row's predicted distribution is what TRL logs as `entropy` (its mean over trained tokens)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    total = logits[:0].sum()  # 0, in the graph even when there is no row (backward still runs)
    correct = torch.zeros((), dtype=torch.long, device=logits.device)
    entropy = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[0], chunk_tokens):
        part, part_target = logits[start:start + chunk_tokens], target[start:start + chunk_tokens]
        if part.requires_grad:
            total = total + checkpoint(_chunk_loss, part, part_target, use_reentrant=False)
        else:
            total = total + _chunk_loss(part, part_target)
        with torch.no_grad():
            correct += (part.argmax(-1) == part_target).sum()
            log_p = part.float().log_softmax(-1)
            entropy -= (log_p.exp() * log_p).sum()
    return total, int(correct.item()), float(entropy.item())


def _chunk_loss(part: Any, target: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(part.float(), target, reduction="sum")


_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


def completion_loss(model: Any, inputs: dict, num_items: Any = None,
                    chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[Any, dict]:
    """Summed cross-entropy over trained tokens / num_items, computing logits ONLY at those positions.

    Position i predicts token i+1, so the kept columns are those whose NEXT label is trained. The
    model's own forward applies its output head (and Gemma's final logit softcapping) to just these
    columns (`logits_to_keep` with indices; several rows share the union of their columns). A model
    that ignores `logits_to_keep` returns every position: its logits are gathered instead, with a warning.
    `num_items` is the Trainer's `num_items_in_batch` (trained tokens of the whole optimizer step, over
    `labels[..., 1:]`); without it the mean is over this batch's trained tokens, as transformers does.
    """
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    keep, column = torch.unique(cols, sorted=True, return_inverse=True)
    out = model(**{k: inputs[k] for k in _FORWARD_KEYS if k in inputs}, logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.shape[1] != len(keep):  # len(keep) < sequence length: a model that kept every position
        _warn_every_position(type(model).__name__)
        logits = logits[:, keep]
    loss_sum, correct, entropy = chunked_cross_entropy(logits[rows, column], targets[rows, cols], chunk_tokens)
    return _mean(loss_sum, num_items, len(rows)), _info(correct, len(rows), entropy, inputs)


def full_logits_loss(model: Any, inputs: dict, num_items: Any = None) -> tuple[Any, dict]:
    """The standard path, for comparison (tests, `rlm-train bench train`): the model's own loss from logits
    at EVERY position (transformers' causal-LM loss: fp32 logits, shifted labels, sum / num_items)."""
    import torch

    out = model(**{k: inputs[k] for k in _FORWARD_KEYS if k in inputs}, labels=inputs["labels"],
                num_items_in_batch=num_items, use_cache=False)
    targets = inputs["labels"][:, 1:]
    trained = targets != -100
    with torch.no_grad():
        logits = out.logits[:, :-1][trained]
        log_p = logits.float().log_softmax(-1)
        entropy = float(-(log_p.exp() * log_p).sum().item())
        correct = int((logits.argmax(-1) == targets[trained]).sum().item())
    return out.loss, _info(correct, int(trained.sum()), entropy, inputs)


def _mean(loss_sum: Any, num_items: Any, trained: int) -> Any:
    import torch

    denom = num_items if num_items is not None else max(trained, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom


def _info(correct: int, trained: int, entropy: float, inputs: dict) -> dict:
    """What the trainer logs from a loss call: the trained tokens' correct argmax count and summed entropy,
    and the tokens the batch holds (its attention mask's ones, or all of its one packed row)."""
    mask = inputs.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    return {"correct": correct, "trained": trained, "entropy": entropy, "tokens": tokens}


def _warn_every_position(model_class: str) -> None:
    import warnings

    warnings.warn(f"{model_class} ignores logits_to_keep: its logits are computed at every position "
                  "(the standard path) and gathered at the trained ones", stacklevel=3)


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
