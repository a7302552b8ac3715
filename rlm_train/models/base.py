"""The one small interface every policy backend implements.

A policy turns a chat (list of {"role", "content"} dicts) into a Completion. All
backends are async so hundreds of episodes share one event loop; a blocking
backend (in-process transformers) runs its work in a thread.

The loop tells a policy where each call comes from with a `CallContext`: typed fields
that wrappers decide on (GRPO records only the root episode's own turns; the direct
baseline answers only root turns), and `hints`, the caller's side information that only
the scripted teacher and test mocks read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Protocol, runtime_checkable

Message = dict[str, str]


class Role(enum.StrEnum):
    """Which kind of call a policy is answering."""

    ROOT = "root"  # a turn of an RLM episode: the root's own, or a child RLM's (depth > 0)
    SUB = "sub"  # an llm_query from a cell (and rlm_query at the depth limit)
    DIRECT = "direct"  # the context-in-prompt baseline's one question (eval/direct.py)


# Keys the loop sets as typed fields: a caller's hints may not carry them.
CONTEXT_FIELDS = ("role", "depth", "turn", "last_turn", "query")


@dataclass(frozen=True)
class CallContext:
    """Where a model call comes from, set by the loop and read-only to policies."""

    role: Role
    depth: int
    """0 for the root episode's own turns; a child RLM's turns and a sub-call made at depth
    d are at depth d + 1."""
    query: str
    """The query of the episode making the call."""
    turn: int | None = None
    """A root turn's 0-based index in its episode; None for sub-calls."""
    last_turn: bool = False
    """The answer-now turn after rlm.max_iterations."""
    hints: Mapping[str, Any] = field(default_factory=dict)
    """The caller's side information (task family, id, sample index, meta): only the
    scripted teacher and test mocks read it; real models ignore it. Read-only."""

    def __post_init__(self) -> None:
        if not isinstance(self.hints, MappingProxyType):  # the loop passes one frozen copy per call tree
            object.__setattr__(self, "hints", MappingProxyType(dict(self.hints)))


def check_hints(hints: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's hints as a plain dict; keys the loop sets as typed fields are refused."""
    hints = dict(hints or {})
    taken = sorted(set(hints) & set(CONTEXT_FIELDS))
    if taken:
        raise ValueError(f"hints {taken} are set by the loop (CallContext fields); hints carry only side "
                         "information such as family, task_id, sample, meta")
    return hints


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
        call: CallContext | None = None,
    ) -> Completion:
        """Answer the chat. `call` says where it comes from (None: outside any episode);
        a real model reads neither it nor its hints."""
        ...

    async def aclose(self) -> None: ...


def approx_tokens(text: str) -> int:
    """A stated estimate (4 characters a token) for policies that use no tokenizer."""
    return len(text) // 4 + 1


# What a CallablePolicy's function gets when a policy is called outside any episode.
OUTSIDE_EPISODE = CallContext(role=Role.ROOT, depth=0, query="")


class CallablePolicy:
    """A policy from a plain function `fn(messages, call: CallContext) -> str` (sync or async).

    The scripted teacher, the oracle, baselines and test mocks are all this: a model
    whose answers are computed. `latency_s` adds a non-blocking delay per call, like a
    served model would. Token counts are `approx_tokens` estimates.
    """

    def __init__(self, fn, name: str = "callable", latency_s: float = 0.0):
        self.fn = fn
        self.name = name
        self.latency_s = latency_s
        self.calls = 0

    async def chat(self, messages, sampling=None, call=None) -> Completion:
        import asyncio
        import inspect
        import time

        started = time.monotonic()
        self.calls += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self.fn(messages, call or OUTSIDE_EPISODE)
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
