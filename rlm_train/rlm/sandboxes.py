"""The sandboxes of one RLM call tree, and how the whole tree stops.

Every episode of a tree (the root, each child RLM) has one REPL session, started in a thread
while the model writes its first turn (a start blocks on the fork-server), and closed in one
once the episode ends. Its cells run on the event loop, in the episode's own task
(`REPLSession.execute_async`): no thread per cell, and a cell's sub-calls are answered on the
loop in that task too. REPLSession's contract forbids close() while a cell runs, so a session
is closed only once it exists and no cell of it runs; its slot (rlm.budget.SandboxSlots) is
given back after that, when its worker is gone.

A tree is cancelled when the task running its root episode is (a client that left the
gateway, a stopped run). The cancellation reaches every cell and sub-call of the tree, since
they run in that task or in tasks it awaits (the child RLMs' among them): a cell cancelled
kills its worker before it ends, and `CallTree.cancel` refuses new sub-calls meanwhile.
`run_episode` waits until every sandbox of the tree is closed (`CallTree.wait_closed`) before
the cancellation goes on: what the tree started is gone when its task ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

from rlm_train.repl.api import ExecResult, SandboxConfig
from rlm_train.rlm.budget import SandboxSlots, Slot

if TYPE_CHECKING:
    from rlm_train.repl.session import REPLSession

# Session starts and closes block on the fork-server and the worker's exit; a generation
# run starts a wave of them at once, more than the default executor's handful of threads.
REPL_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="rlm-repl")


class TreeCancelled(Exception):
    """A sub-call of a call tree that was cancelled: what the cell sees instead of an answer."""


class CallTree:
    """What a cancellation of one call tree must reach: whether it may still make sub-calls,
    and its sandboxes not yet closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: SandboxSlots):
        self.loop = loop
        self.slots = slots
        self.cancelled = False
        self._lock = threading.Lock()  # sessions are closed in threads
        self._sandboxes: set[EpisodeSandbox] = set()

    def check(self) -> None:
        """TreeCancelled once the tree is cancelled: no more sub-calls."""
        if self.cancelled:
            raise TreeCancelled("the request was cancelled: no more sub-calls")

    def cancel(self) -> None:
        """Refuse new sub-calls (called on the tree's loop, as its task is cancelled); idempotent."""
        self.cancelled = True

    def busy(self) -> bool:
        with self._lock:
            return bool(self._sandboxes)

    async def wait_closed(self) -> None:
        """Until every sandbox of the tree is closed, even if the waiting task is cancelled
        again meanwhile (the wait is bounded: cancelled cells killed their workers)."""
        async def settle() -> None:
            while self.busy():
                await asyncio.sleep(0.02)

        waiting = asyncio.ensure_future(settle())
        while not waiting.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(waiting)


class EpisodeSandbox:
    """One episode's REPL session: started at once in a thread, one cell at a time on the
    loop, closed only when no cell runs, its slot given back once it is closed."""

    def __init__(self, tree: CallTree, slot: Slot, context: Any, config: SandboxConfig, llm: Any):
        from rlm_train.repl import REPLSession

        self.tree = tree
        self.slot = slot
        self._running = False
        self._close_asked = False
        with tree._lock:
            tree._sandboxes.add(self)
        self._session: concurrent.futures.Future[REPLSession] = REPL_THREADS.submit(
            REPLSession, context, config=config, llm=llm)

    async def execute(self, code: str) -> ExecResult:
        session = self._session.result() if self._session.done() else await asyncio.wrap_future(self._session)
        if self.tree.cancelled:
            raise TreeCancelled("the request was cancelled")
        if self._running or self._close_asked:
            raise RuntimeError("an episode's sandbox runs one cell at a time, and none once it is closed")
        self._running = True
        try:
            return await session.execute_async(code)
        finally:
            self._running = False
            if self._close_asked:
                self._close_when_started()

    def close(self) -> None:
        """Close the session once it exists and its cell (if any) returned; called once, when
        the episode ends. No cell starts after it: the episode that ran them is over."""
        self._close_asked = True
        if not self._running:
            self._close_when_started()

    def _close_when_started(self) -> None:
        if self._session.done():
            REPL_THREADS.submit(self._close_now)
        else:
            self._session.add_done_callback(lambda _: REPL_THREADS.submit(self._close_now))

    def _close_now(self) -> None:
        try:
            if not self._session.cancelled() and self._session.exception() is None:
                self._session.result().close()
        finally:
            self.slot.give_back()
            with self.tree._lock:
                self.tree._sandboxes.discard(self)


class LazySandbox:
    """An episode's sandbox, started on the first `get()`: the loop asks at once for a policy
    that writes code, and on the first code block (or FINAL_VAR) for one that says it does not
    (`writes_code = False`, the direct baseline), so such episodes start none."""

    def __init__(self, tree: CallTree, wait_s: float, context: Any, config: SandboxConfig, llm: Any):
        self.tree, self.wait_s, self.context, self.config, self.llm = tree, wait_s, context, config, llm
        self.sandbox: EpisodeSandbox | None = None
        self._asked_at: float | None = None

    async def get(self) -> EpisodeSandbox:
        if self.sandbox is None:
            self._asked_at = time.monotonic()
            slot = await self.tree.slots.take(self.wait_s)
            self.sandbox = EpisodeSandbox(self.tree, slot, self.context, self.config, self.llm)
        return self.sandbox

    async def execute(self, code: str) -> ExecResult:
        return await (await self.get()).execute(code)

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()

    def waited_s(self) -> float:
        """How long the episode waited for a sandbox slot (asked for and none came: till now)."""
        if self.sandbox is not None:
            return self.sandbox.slot.waited_s
        return 0.0 if self._asked_at is None else time.monotonic() - self._asked_at
