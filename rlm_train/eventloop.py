"""The event loop the host runs on: uvloop where it is installed, asyncio's own otherwise.

uvloop halves the CPU the client and the mock server spend on a generation run's first wave
of connections (docs/measurements.md). Everything here works on either loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
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
    the run: a full collection then walks only what the run made, where one long pause
    stalls every episode on the loop. The young generation is also collected every 10,000
    rather than 700 allocations: most objects of a turn die by reference count first
    (docs/measurements.md has the numbers). Those settings are
    process-wide: one run() at a time per process (the CLI commands are).

    Called where a loop already runs in this thread (Jupyter, IPython), `main` runs to the end
    on a worker thread with a loop of its own (`run_beside_running_loop`)."""
    if _loop_running():
        return run_beside_running_loop(main)
    thresholds = gc.get_threshold()
    gc.freeze()  # no collect() first: it would cost the full walk this avoids
    gc.set_threshold(max(thresholds[0], 10_000), *thresholds[1:])
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_beside_running_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a new loop in a worker thread and wait for it (this thread's loop cannot
    run it: it is busy running the caller). Interrupted while waiting (Ctrl-C, a notebook's stop
    button), `main` is cancelled, so its sandboxes close, before the interrupt goes on."""
    outcome: dict[str, Any] = {}
    started, finished = threading.Event(), threading.Event()

    async def tracked() -> T:
        outcome["loop"], outcome["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        return await main

    def target() -> None:
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                outcome["result"] = runner.run(tracked())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc
        finally:
            started.set()
            finished.set()

    threading.Thread(target=target, name="rlm-train-loop", daemon=True).start()
    # An Event, not Thread.join: a KeyboardInterrupt inside join marks a live thread as stopped (3.11).
    try:
        while not finished.wait(0.25):  # short waits: an interrupt is handled between them
            pass
    except KeyboardInterrupt:
        started.wait()
        if "task" in outcome and not finished.is_set():
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nothing left to cancel
                outcome["loop"].call_soon_threadsafe(outcome["task"].cancel)
        finished.wait()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
