"""What every hostile-cell test shares: a heartbeat that catches a stalled host, a session
factory, and `attack`, which runs one hostile cell and checks the host's side."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import psutil
import pytest

from rlm_train.repl import REPLSession, SandboxConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = SandboxConfig(timeout_s=5, memory_mb=256, max_output_chars=2000, max_message_mb=4)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the full sandbox needs root here")


class Heartbeat:
    """A thread that ticks every 10 ms: a host frozen by a worker's frame (GIL held,
    event loop stuck) shows up as a long gap between ticks."""

    def __init__(self):
        self.last = time.monotonic()
        self.max_gap = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.01):
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - self.last)
            self.last = now

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.max_gap


def _uid_of(s: REPLSession) -> int:
    return psutil.Process(s.pid).uids().real


def _session_processes(uid: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def hostile_session(config: SandboxConfig = CFG, context="ctx", llm=None):
    with REPLSession(context, config=config, llm=llm) as s:
        yield s


async def _on_a_loop(s: REPLSession, code: str):
    """The cell through the RLM loop's path (execute_async), beside a coroutine that ticks
    every 10 ms: a wait that blocks the event loop shows up as a long gap between ticks."""
    gap, last = 0.0, time.monotonic()

    async def tick():
        nonlocal gap, last
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gap, last = max(gap, now - last), now

    ticker = asyncio.create_task(tick())
    try:
        result = await s.execute_async(code)
    finally:
        ticker.cancel()
    return result, max(gap, time.monotonic() - last)


def attack(s: REPLSession, code: str, max_seconds: float | None = None):
    """Run one hostile cell on an event loop, as the RLM loop runs it, and check the host's
    side: responsive throughout (the loop and other threads), back within the cell clock,
    nothing of the session left running, the next cell (run blocking) works."""
    beat = Heartbeat()
    t0 = time.monotonic()
    try:
        r, loop_gap = asyncio.run(_on_a_loop(s, code))
    finally:
        gap = beat.close()
    took = time.monotonic() - t0
    assert gap < 1.0, f"the host stalled for {gap:.2f}s"
    assert loop_gap < 1.0, f"the event loop stalled for {loop_gap:.2f}s"
    assert took < (max_seconds or s.config.timeout_s + 3), f"execute took {took:.1f}s"
    if s.pid is not None and not s.config.allow_background:
        assert _session_processes(_uid_of(s)) == [s.pid]
    nxt = s.execute("print(40 + 2)")
    assert nxt.stdout == "42\n", nxt
    return r


def frame(payload: bytes, length: int | None = None) -> str:
    """Cell code writing one raw frame to the host channel (fd 3)."""
    n = len(payload) if length is None else length
    return f"import os, struct\nos.write(3, struct.pack('<Q', {n}) + {payload!r})\nimport time\ntime.sleep(30)"
