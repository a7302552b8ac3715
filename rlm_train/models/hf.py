"""In-process transformers policy: `hf:MODEL` or `hf:MODEL+adapter:ADAPTER` (MODEL: any spec `loading.resolve_model` takes).

Loads through `rlm_train.models.loading` (the one place weights, tokenizers and
templates are read). `generate` is blocking, so `chat` runs it in a worker thread;
calls are serialized with a lock because one model instance is not safe to
generate from concurrently.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from rlm_train.models.base import CallContext, Completion, Message, PolicyError, SamplingParams


class HFPolicy:
    """A causal LM (optionally with a PEFT adapter) answering chats in-process."""

    def __init__(self, path: str, adapter: str | None = None, *, dtype: str = "float32",
                 chat_template: str = "auto", num_threads: int | None = None, name: str | None = None):
        from rlm_train.models.loading import end_of_turn_ids, load_for_inference

        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.path = str(path)
        self.adapter = str(adapter) if adapter else None
        self.name = name or (f"hf:{self.path}+adapter:{self.adapter}" if self.adapter else f"hf:{self.path}")
        self.model, self.tokenizer = load_for_inference(self.path, self.adapter, dtype=dtype, chat_template=chat_template)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self._lock = threading.Lock()

    async def chat(self, messages: list[Message], sampling: SamplingParams | None = None,
                   call: CallContext | None = None) -> Completion:
        # A real model answers the chat alone: where the call comes from changes nothing.
        return await asyncio.to_thread(self._generate, messages, sampling or SamplingParams())

    def _generate(self, messages: list[Message], sampling: SamplingParams) -> Completion:
        import torch

        from rlm_train.models.loading import render_chat

        start = time.perf_counter()
        try:
            prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        except Exception as exc:
            raise PolicyError(f"{self.name}: chat template failed on these messages: {exc}") from exc
        input_ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": sampling.temperature > 0,
        }
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        with self._lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new_ids = out[0, input_ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "stop" if (new_ids and new_ids[-1] in self.stop_ids) else "length"
        for stop in sampling.stop or []:  # OpenAI semantics: the stop string is not part of the answer
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Completion(
            text=text,
            prompt_tokens=input_ids.shape[1],
            completion_tokens=len(new_ids),
            latency_s=time.perf_counter() - start,
            finish_reason=finish,
            extra={"backend": "hf", "completion_ids": new_ids},
        )

    async def aclose(self) -> None:
        # Drop the weights so a long eval can load the next policy without holding two.
        self.model = None
