"""One budget shared by the whole call tree of an episode (root, children, sub-calls)."""

from __future__ import annotations

import threading
import time


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
