"""What the host does with a cell's sub-call request (llm_query, rlm_query and their batched
forms): check it, cheapest first, and get the session's handler to answer it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Callable, cast

from rlm_train.repl import child_context
from rlm_train.repl.api import LLMArg, SubcallHandler

MAX_BATCH = 10_000  # prompts in one sub-call frame


def checked_request(op: str, items, llm: LLMArg) -> tuple[list[str], list | None]:
    """The prompts (and rlm_query pairs) of a request, cheapest checks first: its size and
    whether there is a sub-model at all come before anything walks its items."""
    if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
        raise ValueError(f"a sub-call request needs 1 to {MAX_BATCH} prompts")
    if llm is None:
        raise RuntimeError("no sub-model configured: this REPL session has llm=None, "
                           "so llm_query/rlm_query cannot be used here")
    if op == "llm":
        if not all(isinstance(p, str) for p in items):
            raise ValueError("malformed sub-call request: prompts must be strings")
        return items, None
    if not all(isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) for it in items):
        raise ValueError("malformed rlm_query request")
    # Contexts stay JSON text here: the child's worker decodes them, charged to its session.
    pairs = [(it[0], child_context.EncodedContext.from_wire(it[1])) for it in items]
    return [p for p, _ in pairs], pairs


async def answer(loop: asyncio.AbstractEventLoop | None, llm: LLMArg, prompts: list[str], pairs: list | None,
                 max_parallel: int) -> list[str]:
    """The handler's answers, one string per prompt: an async handler awaited on the loop; a
    blocking one called here (no loop: a blocking cell) or in a thread (on a loop, which it
    must not stall)."""
    batch = getattr(llm, "llm_batch" if pairs is None else "rlm_batch", None)
    if batch is not None and inspect.iscoroutinefunction(batch):
        if loop is None:
            raise RuntimeError("this session's sub-model handler is async: run the cell with execute_async")
        results = list(await batch(prompts if pairs is None else pairs))
    elif loop is None:
        results = _call_blocking(llm, prompts, pairs, max_parallel)
    else:
        results = await asyncio.to_thread(_call_blocking, llm, prompts, pairs, max_parallel)
    if len(results) != len(prompts):
        raise RuntimeError(f"sub-model handler returned {len(results)} answers for {len(prompts)} prompts")
    return [r if isinstance(r, str) else str(r) for r in results]


def _call_blocking(llm: LLMArg, prompts: list[str], pairs: list | None, max_parallel: int) -> list:
    if hasattr(llm, "llm_batch"):
        handler = cast(SubcallHandler, llm)
        return list(handler.llm_batch(prompts) if pairs is None else handler.rlm_batch(pairs))
    fn = cast(Callable[[str], str], llm)  # a plain fn: rlm_query degrades to llm_query
    if len(prompts) == 1:
        return [fn(prompts[0])]
    workers = max(1, min(len(prompts), max_parallel))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-subcall") as pool:
        return list(pool.map(fn, prompts))
