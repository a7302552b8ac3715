"""What the train bench divides by: this CPU's matmul rate, and the useful FLOPs of a training or
generation pass counted from the model's own modules.

Counting (model FLOPs, the MFU convention: a multiply-add is 2 FLOPs; norms, activations, softmax,
rotary and the optimizer are left out; padding and masked-out attention blocks are never counted):

- forward, per token: 2 x the frozen decoder linears N (every weight once) + 2 x the LoRA
  parameters, plus attention: QK^T and AV, 2 x 2 x (keys attended) x (query width) per layer, where
  a causal token at position i attends to min(i + 1, window) keys (sliding-window layers) or i + 1;
- the output head (d x V) only at the positions whose logits are computed: 2 x d x V each;
- training with LoRA: the frozen weights get no weight gradient, but the gradient still flows
  through them to the adapters below, so backward costs one matmul per frozen weight (input
  gradient) instead of two: 4 x N per token, not the usual 6 x N. LoRA weights take all three
  (forward, input gradient, weight gradient): 6 x their parameters. Attention has no weights and
  its backward is two matmuls per forward one: 3 x its forward. The head is frozen (tied to the
  embeddings): 4 x d x V per computed logit. The embedding lookup is not a matmul: 0.
  (Layer 0's q/k/v input gradient is counted though autograd skips it: under 1% of N.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


def matmul_rate(dtype_name: str, threads: int, size: int, repeats: int) -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second of this process) of torch.matmul on two random
    [size, size] matrices of `dtype_name` on `threads` threads, each the best of `repeats` runs after one
    warm-up. The second is what one busy core does, whatever else the machine runs meanwhile."""
    import torch

    dtype = getattr(torch, dtype_name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.matmul(a, b)
        wall = cpu = float("inf")
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            torch.matmul(a, b)
            wall = min(wall, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
    finally:
        torch.set_num_threads(before)
    flops = 2 * size ** 3
    return flops / wall, flops / max(cpu, 1e-9)


def cpu_thread_counts() -> list[int]:
    """1 and all the cores this process may use (on a shared machine one thread can beat two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, cores})


def measure_peak(quick: bool = False) -> dict:
    """fp32 (and, for reference, bf16) matmul FLOP/s at each thread count, per wall second and per CPU
    second; `fp32_best` and `fp32_per_cpu_s_best` are the denominators of the fractions the bench prints."""
    fp32_size, bf16_size, repeats = (512, 256, 2) if quick else (2048, 1024, 4)
    out: dict[str, Any] = {"fp32_size": fp32_size, "bf16_size": bf16_size, "fp32": {}, "bf16": {},
                           "fp32_per_cpu_s": {}}
    for threads in cpu_thread_counts():
        out["fp32"][str(threads)], out["fp32_per_cpu_s"][str(threads)] = matmul_rate("float32", threads, fp32_size,
                                                                                    repeats)
        out["bf16"][str(threads)] = matmul_rate("bfloat16", threads, bf16_size, max(1, repeats // 2))[0]
    out["fp32_best"] = max(out["fp32"].values())
    out["fp32_per_cpu_s_best"] = max(out["fp32_per_cpu_s"].values())
    out["bf16_best"] = max(out["bf16"].values())
    return out


@dataclass(frozen=True)
class ModelShape:
    """The parts of a causal LM that cost FLOPs per token, counted from its modules."""

    linear_params: int
    """Frozen nn.Linear weights in the decoder layers (the output head not included)."""
    lora_params: int
    head_params: int
    """The output head, d x V (tied or not)."""
    query_width: int
    """Attention heads x head dim: the width of QK^T and AV per layer."""
    layer_windows: tuple[int | None, ...]
    """Per decoder layer, its sliding window in tokens (None: global attention)."""

    @property
    def described(self) -> str:
        local = sum(w is not None for w in self.layer_windows)
        return (f"{self.linear_params / 1e6:.1f}M in decoder linears, {self.lora_params / 1e6:.2f}M LoRA, "
                f"head {self.head_params / 1e6:.1f}M, {len(self.layer_windows)} layers ({local} sliding-window), "
                f"query width {self.query_width}")


def model_shape(model: Any) -> ModelShape:
    import torch

    head = model.get_output_embeddings()
    linear = lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if ".lora_A." in name or ".lora_B." in name or name.endswith(("lora_A", "lora_B")):
            lora += module.weight.numel()
        else:
            linear += module.weight.numel()
    config = model.config
    config = getattr(config, "text_config", None) or config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    windows = tuple(window if kind == "sliding_attention" and window else None for kind in types)
    return ModelShape(linear, lora, head.weight.numel(), config.num_attention_heads * head_dim, windows)


def attended_keys(length: int, window: int | None) -> int:
    """Keys attended by all `length` causal positions of one sequence: sum of min(i + 1, window)."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def attention_forward(shape: ModelShape, length: int) -> float:
    return sum(4.0 * attended_keys(length, w) * shape.query_width for w in shape.layer_windows)


def forward_flops(shape: ModelShape, length: int, logits: int) -> float:
    """One forward pass over a `length`-token sequence with logits at `logits` positions."""
    per_token = 2.0 * (shape.linear_params + shape.lora_params)
    return per_token * length + attention_forward(shape, length) + 2.0 * shape.head_params * logits


def lora_train_flops(shape: ModelShape, length: int, logits: int) -> float:
    """Forward + backward of a LoRA step over one sequence (the module docstring says why 4 N, not 6 N)."""
    per_token = 4.0 * shape.linear_params + 6.0 * shape.lora_params
    return per_token * length + 3 * attention_forward(shape, length) + 4.0 * shape.head_params * logits


def sample_lengths(position_ids: Any) -> list[int]:
    """The samples of one packed row, from its position ids (they restart at 0 per sample)."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [b - a for a, b in zip(starts, starts[1:])]
