"""One budget shared by the whole call tree of an episode (root, children, sub-calls), and
the sandboxes a call tree (or a gateway's every tree) may hold at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque


class BudgetExhausted(Exception):
    """Raised when a call would go past a budget; the message says which one."""


class Budget:
    """Limits on sub-calls, tokens and wall time. A child RLM's budget has the tree's as its
    `parent`: what the child spends counts against both, and either running out stops it."""

    def __init__(
        self,
        max_subcalls: int | None = None,
        max_tokens: int | None = None,
        max_wall_s: float | None = None,
        parent: Budget | None = None,
        name: str = "",
    ):
        self.max_subcalls = max_subcalls
        self.max_tokens = max_tokens
        self.max_wall_s = max_wall_s
        self.parent = parent
        self.name = name  # e.g. "child RLM ": where a budget's message says whose it is
        self.started = time.monotonic()
        self.subcalls = 0
        self.tokens = 0
        self.exhausted: str | None = None  # the first reason, kept for the trajectory
        self._lock = threading.Lock()

    def _exhaust(self, reason: str) -> None:
        with self._lock:
            if self.exhausted is None:
                self.exhausted = reason
        raise BudgetExhausted(reason)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        """Raise if the episode is out of wall time or tokens (or already exhausted)."""
        if self.exhausted:
            raise BudgetExhausted(self.exhausted)
        if self.parent is not None:
            self.parent.check()
        if self.max_wall_s is not None and self.elapsed() > self.max_wall_s:
            self._exhaust(f"{self.name}wall time budget of {self.max_wall_s:g}s exhausted")
        if self.max_tokens is not None and self.tokens > self.max_tokens:
            self._exhaust(f"{self.name}token budget of {self.max_tokens} exhausted ({self.tokens} used)")

    def reserve_subcalls(self, n: int) -> None:
        """Reserve n sub-calls up front, so a runaway fan-out is refused before it starts."""
        self.check()
        if self.parent is not None:
            self.parent.reserve_subcalls(n)
        with self._lock:
            fits = self.max_subcalls is None or self.subcalls + n <= self.max_subcalls
            if fits:
                self.subcalls += n
        if not fits:
            self._exhaust(
                f"sub-call budget of {self.max_subcalls} exhausted "
                f"({self.subcalls} used, {n} more requested)"
            )

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n
        if self.parent is not None:
            self.parent.add_tokens(n)


class SandboxWaitExceeded(BudgetExhausted):
    """No sandbox came free for an episode while it waited (SandboxSlots.take)."""


class SandboxSlots:
    """REPL sandboxes that may be alive at once: one call tree's (its root episode and its child
    RLMs), or, as the trees' `parent`, those of every tree of a process (the gateway's budget).
    A slot is taken before a sandbox starts and given back once its worker is gone, so what
    is counted is what runs. Waiters are served in order; one gives up after `patience_s` in
    which no slot was given back (a tree whose every sandbox waits for its own children).
    Used on one event loop; `Slot.give_back` may be called from any thread."""

    def __init__(self, limit: int, parent: SandboxSlots | None = None, name: str = "sandbox"):
        self.limit = limit
        self.parent = parent
        self.name = name  # where a wait's message says whose slots were all busy
        self.held = 0
        self.peak = 0
        self.given_back = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def take(self, patience_s: float) -> Slot:
        """A slot here and in the parent; raises SandboxWaitExceeded when none came free."""
        started = time.monotonic()
        await self._take_here(patience_s)
        if self.parent is not None:
            try:
                await self.parent._take_here(patience_s)
            except BaseException:
                self._give_here()
                raise
        return Slot(self, time.monotonic() - started)

    async def _take_here(self, patience_s: float) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.held < self.limit and not self._waiters:
            self.held += 1
            self.peak = max(self.peak, self.held)
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            while True:
                seen = self.given_back
                done, _ = await asyncio.wait({waiter}, timeout=patience_s)
                if done:
                    return  # handed over by _give_here: `held` already counts it
                if self.given_back == seen:
                    raise SandboxWaitExceeded(
                        f"no sandbox came free for {patience_s:g}s: all {self.limit} of {self.name} are in use "
                        "and none was given back (rlm.sandbox_wait_s)")
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_here()  # handed over just as this waiter left: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            raise

    def _give_here(self) -> None:
        self.given_back += 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the first waiter: no overtaking
                return
        self.held -= 1

    def _give_back_threadsafe(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._give_here()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits on it any more
            loop.call_soon_threadsafe(self._give_here)


class Slot:
    """One sandbox's place in a SandboxSlots (and its parent); given back exactly once."""

    def __init__(self, slots: SandboxSlots, waited_s: float):
        self.slots = slots
        self.waited_s = waited_s
        self._given = False
        self._lock = threading.Lock()

    def give_back(self) -> None:
        with self._lock:
            if self._given:
                return
            self._given = True
        self.slots._give_back_threadsafe()
        if self.slots.parent is not None:
            self.slots.parent._give_back_threadsafe()
