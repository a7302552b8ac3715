"""Weight pushes to the vLLM server (TRL server mode), made safe for several training ranks.

TRL's `VLLMGeneration.sync_weights` pushes from rank 0 only and returns at once on the other ranks, then
asks the server to reset its prefix cache and ignores the answer. Two things go wrong:

- the other ranks start their episodes while rank 0 is still pushing, so their first turns are
  sampled from a half-updated model;
- vLLM refuses the reset while requests run (`{"success": false}`), and cached prefixes computed with
  the old weights are then reused.

`trl_compat.install_ordered_weight_sync` wraps it with the pieces here: rank 0 pushes, then resets the
cache and checks the reset (retrying while the server is busy, failing clearly when it never succeeds),
and every rank waits at a barrier before any episode starts. With a PEFT model the merged weights are computed out of place
(base + delta), so the base weights are never merged into and unmerged from (in bf16 that drifts).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator


class PrefixCacheNotReset(RuntimeError):
    pass


def reset_prefix_cache_checked(session: Any, base_url: str, timeout_s: float = 120.0, interval_s: float = 0.5,
                               sleep: Callable[[float], None] = time.sleep) -> int:
    """POST /reset_prefix_cache until the server says it reset (vLLM answers {"success": false} while
    requests run; an empty 200 body is an older server's success). Returns the number of tries."""
    deadline = time.monotonic() + timeout_s
    tries = 0
    while True:
        tries += 1
        response = session.post(f"{base_url}/reset_prefix_cache", timeout=60)
        if response.status_code == 404:
            raise PrefixCacheNotReset(
                f"vLLM server {base_url} has no /reset_prefix_cache endpoint: start it with VLLM_SERVER_DEV_MODE=1 "
                "(rlm-train grpo --vllm-command prints the full command)")
        if response.status_code == 200:
            body = response.json() if response.content.strip() else {}
            if not isinstance(body, dict) or body.get("success", True):
                return tries
            why = "refused while requests were running"
        else:
            why = f"HTTP {response.status_code}: {response.text[:200]}"
        if time.monotonic() >= deadline:
            raise PrefixCacheNotReset(
                f"vLLM server {base_url} did not reset its prefix cache after the weight push ({why}; {tries} tries "
                f"in {timeout_s:g}s), so it would reuse prefixes computed with the old weights; make sure nothing "
                "else sends requests to this server during training")
        sleep(interval_s)


def iter_merged_params(model: Any, fix_name: Callable[..., str]) -> Iterator[tuple[str, Any]]:
    """(vLLM name, tensor) for every base weight of a PEFT LoRA model, LoRA layers merged out of place:
    base + delta is computed in float32 and cast once, and the model's own tensors are never written."""
    import torch
    from peft.tuners.lora import LoraLayer

    lora_layers = {f"{name}.base_layer.weight": module for name, module in model.named_modules()
                   if isinstance(module, LoraLayer) and hasattr(module, "base_layer")}
    lora_prefix = getattr(model, "prefix", "lora_")
    for name, param in model.named_parameters():
        vllm_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if lora_prefix in vllm_name or "original_module" in vllm_name:
            continue
        vllm_name = fix_name(vllm_name, extra_prefixes=["modules_to_save.default."])
        layer: Any = lora_layers.get(name)
        if layer is None:
            yield vllm_name, param.data
            continue
        with torch.no_grad():
            merged = param.data.float()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A.keys() or adapter in getattr(layer, "lora_embedding_A", {}):
                    merged = merged + layer.get_delta_weight(adapter).float()
            yield vllm_name, merged.to(param.dtype)
