"""The event loop the host runs on: uvloop where it is installed, asyncio's own otherwise.

Measured on a 2-core machine: opening 512 keep-alive connections at once (what the first
wave of a generation run does, 64 episodes x 8 sub-calls) costs the client ~190 ms of CPU
on asyncio's selector loop and ~95 ms on uvloop; serving them costs the mock server
~130 ms against ~65 ms. Everything here works on either loop.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # no wheel for this platform: the standard loop does the same work
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop above.

    The objects alive at the start (modules, the config, the task list: ~10^5 of them
    once pydantic and friends are imported) are moved out of the collector's reach for
    the run: a full collection then walks only what the run made. Measured on a
    200-episode generation: ~50 ms of collector pauses, one of 17 ms that stalled every
    episode on the loop. The young generation is also collected every 10,000 rather than
    700 allocations: most objects of a turn die by reference count first (two young
    collections instead of ~65 in that run, ~5 ms instead of ~40 ms). Those settings are
    process-wide: one run() at a time per process (the CLI commands are)."""
    thresholds = gc.get_threshold()
    gc.freeze()  # no collect() first: it would cost the full walk this avoids
    gc.set_threshold(max(thresholds[0], 10_000), *thresholds[1:])
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
