"""The context-in-prompt baseline (`direct: true`): the paper's "base model" rows.

`DirectPolicy` wraps any policy. On an episode's first root turn it asks the wrapped
model one question, with the task's context (cut to `max_context_chars`) and the query in
the prompt, and answers the loop with the reply as a FINAL(...) line in prose. So the
baseline runs through the same loop, store and scorer as every RLM method, and its records
carry the wrapped model's real token counts (the context included). Its turns carry no code
(`writes_code = False`), so the loop starts no REPL sandbox for its episodes.

The loop never hands a policy the context, so the wrapper reads it itself, by the task id
the call's hints carry, from the task file (once per task; only the kept part stays in memory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

from rlm_train.formats import load_task_context
from rlm_train.models.base import CallContext, Completion, Message, Policy, PolicyError, Role, SamplingParams
from rlm_train.records import TaskRecord

DIRECT_SYSTEM_PROMPT = (
    "Answer the question about the context below. Reply with the answer only: no explanation, "
    "no code, no restating of the question."
)
DIRECT_USER_PROMPT = "Context:\n{context}\n\nQuestion: {query}"


def context_text(context: Any) -> str:
    """A context as prompt text: a string as is, a list one item a line, anything else JSON."""
    if isinstance(context, str):
        return context
    if isinstance(context, list):
        return "\n".join(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in context)
    return json.dumps(context, ensure_ascii=False)


def cut(text: str, max_chars: int) -> str:
    """The first `max_chars` characters, and a note of how many were cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n[... {len(text) - max_chars:,} more characters cut]"


def direct_messages(query: str, kept_context: str) -> list[Message]:
    """The one chat the wrapped model answers."""
    return [{"role": "system", "content": DIRECT_SYSTEM_PROMPT},
            {"role": "user", "content": DIRECT_USER_PROMPT.format(context=kept_context, query=query)}]


def submit(answer: str) -> str:
    """The root turn that submits `answer` as it is: a quoted FINAL in prose, which the loop
    reads without running code (the repr keeps the answer on one line, quotes escaped)."""
    return f"FINAL({answer!r})"


class DirectPolicy:
    """A root policy that answers from the context in its prompt (see the module docstring)."""

    writes_code = False  # the loop starts a sandbox only on a code block, which never comes

    def __init__(self, inner: Policy, tasks: dict[str, TaskRecord], task_file: str | Path, max_context_chars: int):
        self.inner = inner
        self.tasks = tasks
        self.task_file = Path(task_file)
        self.max_context_chars = max_context_chars
        self.name = direct_name(getattr(inner, "name", "policy"), max_context_chars)
        self._contexts: dict[str, asyncio.Task[str]] = {}

    @property
    def stats(self) -> Any:  # the wrapped client's retry counts, for the run summary
        return getattr(self.inner, "stats", None)

    async def _context(self, task_id: str) -> str:
        if task_id not in self._contexts:
            task = self.tasks.get(task_id)
            if task is None:
                raise PolicyError(f"direct: no task {task_id!r} in {self.task_file}")

            def load() -> str:
                return cut(context_text(load_task_context(task, self.task_file)), self.max_context_chars)

            self._contexts[task_id] = asyncio.ensure_future(asyncio.to_thread(load))
        return await self._contexts[task_id]

    async def chat(self, messages: list[Message], sampling: SamplingParams | None = None,
                   call: CallContext | None = None) -> Completion:
        if call is None or call.role != Role.ROOT or call.depth > 0 or call.hints.get("task_id") is None:
            raise PolicyError("direct: only answers an episode's root turn (it makes no sub-calls)")
        context = await self._context(str(call.hints["task_id"]))
        reply = await self.inner.chat(direct_messages(call.query, context), sampling,
                                      dataclasses.replace(call, role=Role.DIRECT))
        return Completion(text=submit(reply.text.strip()), prompt_tokens=reply.prompt_tokens,
                          completion_tokens=reply.completion_tokens, latency_s=reply.latency_s,
                          finish_reason=reply.finish_reason, retries=reply.retries, extra=reply.extra)

    async def aclose(self) -> None:
        self._contexts.clear()
        await self.inner.aclose()


def direct_name(spec: str, max_context_chars: int) -> str:
    """What the records and the run's identity call a direct method."""
    return f"direct[{max_context_chars}]:{spec}"
