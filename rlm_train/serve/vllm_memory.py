"""vLLM's memory on a CPU build, sized from what is free when it starts.

vLLM's CPU build holds `--gpu-memory-utilization` (despite its name, a share of the machine's
memory; 0.9 or more by default) and refuses to start when less than that is free; its KV cache
takes VLLM_CPU_KVCACHE_SPACE GiB (default: half the machine). On a machine where other programs
hold memory both fail at start. `cpu_memory_settings` sets each one the user did not set:

- VLLM_CPU_KVCACHE_SPACE: half of what is free once the weights are loaded (at least 1 GiB, at
  least one sequence of the window, at most vLLM's own default), in whole GiB as vLLM reads it;
- --gpu-memory-utilization: the share of the machine's memory that is free now, less a margin.

Free memory is the kernel's MemAvailable, or this process's cgroup limit less its use when lower.
GPU builds size their memory themselves: nothing is set there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from rlm_train.stage import Note, info, warning

GiB = 1024 ** 3
RUNTIME_BYTES = 1 * GiB  # vLLM's own process (Python, torch, buffers) besides weights and KV cache
MARGIN_BYTES = GiB // 2  # left free below --gpu-memory-utilization for everything else


@dataclass
class Memory:
    total: int
    available: int


def memory_now() -> Memory:
    """The machine's memory and what is available now, within this process's cgroup (v2) limit."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    try:
        line = next(ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::"))
        group = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit.isdigit():
            used = int((group / "memory.current").read_text())
            total, available = min(total, int(limit)), min(available, max(0, int(limit) - used))
    except (OSError, StopIteration, ValueError):
        pass
    return Memory(total, available)


def weights_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's weight files (what vLLM loads into memory)."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in model_dir.glob(pattern)
               if f.is_file())


def kv_bytes_per_token(config: dict) -> int | None:
    """KV cache bytes one token takes (all layers, keys and values), from a model's config.json."""
    config = {**config, **(config.get("text_config") or {})}
    layers, attention_heads, hidden = (config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    heads = config.get("num_key_value_heads") or attention_heads
    head_dim = config.get("head_dim")
    if not isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(attention_heads, int) and attention_heads:
        head_dim = hidden // attention_heads
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(head_dim, int)):
        return None
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 2 * layers * heads * head_dim * (4 if dtype == "float32" else 2)


def _flag_given(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def cpu_memory_settings(model_dir: Path, window: int | None, args: list[str], env: dict[str, str],
                        notes: list[Note], memory: Memory | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment, flags) to add for vLLM's CPU build: each of VLLM_CPU_KVCACHE_SPACE and
    --gpu-memory-utilization the user did not set, sized from the memory free now (module
    docstring); a note says what was chosen, a warning when one sequence of the window does not fit."""
    from rlm_train.serve.vllm_window import read_json_object

    memory = memory or memory_now()
    add_env: dict[str, str] = {}
    add_args: list[str] = []
    chosen = []
    if "VLLM_CPU_KVCACHE_SPACE" not in {**os.environ, **env}:
        free = memory.available - weights_bytes(model_dir) - RUNTIME_BYTES
        config_file = model_dir / "config.json"
        per_token = kv_bytes_per_token(read_json_object(config_file)) if config_file.is_file() else None
        one_sequence = math.ceil(window * per_token / GiB) if window and per_token else 1
        gib = max(1, one_sequence, min(free // 2, memory.total // 2) // GiB)
        add_env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        chosen.append(f"VLLM_CPU_KVCACHE_SPACE={gib} (GiB of KV cache)")
        if gib * GiB > free:
            notes.append(warning(f"vLLM's KV cache needs {gib} GiB (one {window}-token sequence at least) and only "
                         f"{max(0, free) / GiB:.1f} GiB are free besides the weights: vLLM may not start; free memory, "
                         "or lower --max-model-len in --vllm-args"))
    if not _flag_given(args, "--gpu-memory-utilization"):
        share = math.floor(100 * max(0, memory.available - MARGIN_BYTES) / memory.total) / 100
        share = min(0.9, max(0.05, share))
        add_args = ["--gpu-memory-utilization", f"{share:.2f}"]
        chosen.append(f"--gpu-memory-utilization {share:.2f} (the share of memory vLLM may hold)")
    if chosen:
        notes += info(f"vLLM on CPU: {' and '.join(chosen)}, from the {memory.available / GiB:.1f} of "
                      f"{memory.total / GiB:.1f} GiB free now (set them in vllm.env / --vllm-args to choose)")
    return add_env, add_args
