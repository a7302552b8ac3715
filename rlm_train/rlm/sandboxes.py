"""The sandboxes of one RLM call tree, and how the whole tree stops.

Every episode of a tree (the root, each child RLM) has one REPL session, started in a thread
while the model writes its first turn, used by one cell at a time. REPLSession's contract
forbids close() while execute() runs in another thread, so a session is closed only once it
exists and no cell of it runs; its slot (rlm.budget.SandboxSlots) is given back after that,
when its worker is gone.

A tree is cancelled when the task running its root episode is (a client that left the
gateway, a stopped run): `CallTree.cancel` refuses new sub-calls, cancels those in flight
(the child RLMs among them, which cancels their own cells and sub-calls in turn) and kills
the worker of every cell still running, so that its execute() returns and the session can
be closed. `run_episode` waits for that (`CallTree.wait_closed`) before the cancellation
goes on: what the tree started is gone when its task ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Coroutine, TypeVar

from rlm_train.repl.api import ExecResult, SandboxConfig
from rlm_train.rlm.budget import SandboxSlots, Slot

if TYPE_CHECKING:
    from rlm_train.repl.session import REPLSession

T = TypeVar("T")

# REPL cells block their thread while they wait for sub-calls, so the default asyncio
# executor (a handful of threads on 2 cores) would starve at high concurrency.
REPL_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=512, thread_name_prefix="rlm-repl")
_KILL_EVERY_S = 0.1  # a cell whose worker was killed returns within this, or is killed again


class TreeCancelled(Exception):
    """A sub-call of a call tree that was cancelled: what the cell sees instead of an answer."""


class CallTree:
    """What a cancellation of one call tree must reach: its sub-calls in flight (coroutines on
    the tree's loop, awaited by cells in threads) and its sandboxes not yet closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: SandboxSlots):
        self.loop = loop
        self.slots = slots
        self.cancelled = False
        self._lock = threading.Lock()
        self._subcalls: set[concurrent.futures.Future[Any]] = set()
        self._sandboxes: set[EpisodeSandbox] = set()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a sub-call on the tree's loop from a cell's thread and wait for its answer."""
        with self._lock:
            if self.cancelled:
                coro.close()
                raise TreeCancelled("the request was cancelled: no more sub-calls")
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._subcalls.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise TreeCancelled("the request was cancelled while this sub-call ran") from None
        finally:
            with self._lock:
                self._subcalls.discard(future)

    def cancel(self) -> None:
        """Stop everything the tree runs (called on its loop); idempotent."""
        with self._lock:
            self.cancelled = True
            subcalls, sandboxes = list(self._subcalls), list(self._sandboxes)
        for future in subcalls:
            future.cancel()
        for sandbox in sandboxes:
            sandbox.stop_cell()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._subcalls or self._sandboxes)

    async def wait_closed(self) -> None:
        """Until no sub-call runs and every sandbox of the tree is closed, even if the waiting
        task is cancelled again meanwhile (the wait is bounded: cells are killed, sessions closed)."""
        async def settle() -> None:
            while self.busy():
                await asyncio.sleep(0.02)

        waiting = asyncio.ensure_future(settle())
        while not waiting.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(waiting)


class EpisodeSandbox:
    """One episode's REPL session: started at once in a thread, one cell at a time, closed
    only when no cell runs, its slot given back once it is closed."""

    def __init__(self, tree: CallTree, slot: Slot, context: Any, config: SandboxConfig, llm: Any):
        from rlm_train.repl import REPLSession

        self.tree = tree
        self.slot = slot
        self._cell: concurrent.futures.Future[ExecResult] | None = None
        with tree._lock:
            tree._sandboxes.add(self)
        self._session: concurrent.futures.Future[REPLSession] = REPL_THREADS.submit(
            REPLSession, context, config=config, llm=llm)

    async def execute(self, code: str) -> ExecResult:
        session = await asyncio.wrap_future(self._session)
        with self.tree._lock:
            if self.tree.cancelled:
                raise TreeCancelled("the request was cancelled")
            self._cell = REPL_THREADS.submit(session.execute, code)
        return await asyncio.wrap_future(self._cell)

    def stop_cell(self) -> None:
        """Kill the worker of the cell running now (the tree was cancelled), until it returns."""
        cell, session = self._cell, self._session
        if cell is None or cell.done() or session.cancelled() or session.exception() is not None:
            return  # no cell runs (a cell exists only once its session does)
        REPL_THREADS.submit(_kill_until_returned, session.result(), cell)

    def close(self) -> None:
        """Close the session once it exists and its cell (if any) returned; called once, when
        the episode ends. No cell starts after it: the episode that ran them is over."""
        def when_idle(_: Any = None) -> None:
            if not self._session.done():
                self._session.add_done_callback(when_idle)
            elif self._cell is not None and not self._cell.done():
                self._cell.add_done_callback(when_idle)
            else:
                REPL_THREADS.submit(self._close_now)

        when_idle()

    def _close_now(self) -> None:
        try:
            if not self._session.cancelled() and self._session.exception() is None:
                self._session.result().close()
        finally:
            self.slot.give_back()
            with self.tree._lock:
                self.tree._sandboxes.discard(self)


def _kill_until_returned(session: REPLSession, cell: concurrent.futures.Future[ExecResult]) -> None:
    """SIGKILL the session's worker until its execute() returns (it reports the death and
    ends the cell; a cell that restarted a worker gets that one killed too). The pid is only
    used while execute() runs, when the worker is the session's or was just reaped."""
    while not cell.done():
        pid = session.pid
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        concurrent.futures.wait([cell], timeout=_KILL_EVERY_S)
