"""The one small interface every policy backend implements.

A policy turns a chat (list of {"role", "content"} dicts) into a Completion. All
backends are async so hundreds of episodes share one event loop; a blocking
backend (in-process transformers) runs its work in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    retries: int = 0  # transport retries spent getting this answer
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (server url, token ids, ...)


@dataclass
class SamplingParams:
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None


class PolicyError(Exception):
    """A backend could not produce an answer (after its retries). The message says why."""


class RequestRefused(PolicyError):
    """The server answered this one request with a refusal (HTTP 400/413/422: e.g. a prompt
    longer than its window). The server is fine; only this request failed."""


@runtime_checkable
class Policy(Protocol):
    name: str  # the spec string it was built from, recorded in trajectories

    async def chat(
        self,
        messages: list[Message],
        sampling: SamplingParams | None = None,
        hints: dict[str, Any] | None = None,
    ) -> Completion:
        """Answer the chat. `hints` is side information (task family, id, sample index,
        context description) that only the scripted teacher and test mocks read; real
        models must ignore it."""
        ...

    async def aclose(self) -> None: ...


def approx_tokens(text: str) -> int:
    """A stated estimate (4 characters a token) for policies that use no tokenizer."""
    return len(text) // 4 + 1


class CallablePolicy:
    """A policy from a plain function `fn(messages, hints) -> str` (sync or async).

    The scripted teacher, the oracle, baselines and test mocks are all this: a model
    whose answers are computed. `latency_s` adds a non-blocking delay per call, like a
    served model would. Token counts are `approx_tokens` estimates.
    """

    def __init__(self, fn, name: str = "callable", latency_s: float = 0.0):
        self.fn = fn
        self.name = name
        self.latency_s = latency_s
        self.calls = 0

    async def chat(self, messages, sampling=None, hints=None) -> Completion:
        import asyncio
        import inspect
        import time

        started = time.monotonic()
        self.calls += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self.fn(messages, hints or {})
        if inspect.isawaitable(text):
            text = await text
        return Completion(
            text=text,
            prompt_tokens=sum(approx_tokens(m["content"]) for m in messages),
            completion_tokens=approx_tokens(text),
            latency_s=time.monotonic() - started,
            finish_reason="stop",
        )

    async def aclose(self) -> None:
        return None
