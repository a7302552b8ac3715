"""A graceful stop on SIGTERM / SIGINT for training runs (SFT and GRPO), what Slurm sends before a time
limit (`--signal=B:TERM@N`) and what Ctrl-C sends. The first signal asks the run to stop soon:

- at a step's end (the step under way finishes), the trainer writes a checkpoint of that step and leaves
  its loop: what SFT does, whose steps are short;
- during a GRPO rollout (minutes of episodes), the step is abandoned instead: its episodes are cancelled
  (their sandboxes closed), every process raises `StepAbandoned`, and the run checkpoints the last
  completed step (`runtime.train_until_stopped`).

Either way the next run with `resume: auto` continues from the checkpoint, and the process exits with
128 + the signal number. A second signal stops at once (the handler is put back), unless it comes within
a few seconds of the first (rollouts/progress.py: SAME_REQUEST_S): scancel signals every rank and torchrun
passes its own signal on too, so each rank gets the one request twice.

Every process must agree on what it does, or one would wait forever in a collective for the others: the
flag is combined over processes at each step's end and after each rollout (one scalar all-reduce each)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from typing import Any, Coroutine, TypeVar

from rlm_train.rollouts.progress import SignalRepeats
from rlm_train.train.common import main_print, sum_over_processes

T = TypeVar("T")

# Seconds the tasks left behind by an abandoned rollout get to finish by themselves (a sandbox still
# starting is closed once it exists) before they are cancelled too.
_GRACE_S = 0.5

_active: "GracefulStop | None" = None


class StepAbandoned(Exception):
    """A stop was requested while the step's rollouts were generated: the step is dropped on every process."""


class GracefulStop:
    """Install with `with GracefulStop(stage) as stop:`, add `stop.callback()` to the trainer;
    `stop.signal_name` is set when training ended because of a signal."""

    def __init__(self, stage: str, repeats: SignalRepeats | None = None):
        self.stage = stage
        self.requested: str | None = None
        self.signal_name: str | None = None
        self.repeats = repeats or SignalRepeats()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        global _active
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        _active = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            if self.repeats.is_repeat():  # the first one's twin (scancel + torchrun): already stopping
                main_print(f"[{self.stage}] {name} again within {self.repeats.window_s:g} s: the same request")
                return
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second request: the user means it
            raise KeyboardInterrupt(name)
        self.requested = name
        main_print(f"[{self.stage}] {name}: stopping with a checkpoint of the last completed step (a rollout under "
                   f"way is abandoned, a training step finishes first); the next run resumes from it; send it again "
                   f"(after {self.repeats.window_s:g} s) to stop at once")
        self.repeats.first()  # once handled: a twin that came in meanwhile waits for this handler

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if sum_over_processes(1.0 if stop.requested else 0.0) > 0:
                    stop.signal_name = stop.requested or "SIGTERM"
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnSignal()


def stop_requested() -> str | None:
    """The signal a run was asked to stop by (None: none, or no GracefulStop installed)."""
    return _active.requested if _active is not None else None


def run_until_stopped(main: Coroutine[Any, Any, T], poll_s: float = 0.1) -> T | None:
    """`asyncio.run(main)`, unless a stop is requested before or while it runs: then its tasks are
    cancelled (their `finally` blocks close what they opened: an episode its sandbox) and None comes
    back within about a second, without waiting for calls still running in worker threads."""
    loop = asyncio.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="rlm-rollout")
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    stopped = False

    async def watch() -> None:
        nonlocal stopped
        while not task.done():
            if stop_requested():
                stopped = True
                task.cancel()
                return
            await asyncio.sleep(poll_s)

    watcher = loop.create_task(watch())
    try:
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if stopped:
                return None
            raise
    finally:
        watcher.cancel()
        _finish_leftovers(loop, _GRACE_S if stopped else 0.0)
        loop.run_until_complete(loop.shutdown_asyncgens())
        executor.shutdown(wait=not stopped, cancel_futures=stopped)
        asyncio.set_event_loop(None)
        loop.close()


def _finish_leftovers(loop: asyncio.AbstractEventLoop, grace_s: float) -> None:
    """Let the loop's other tasks finish for up to `grace_s`, then cancel what is left and wait for it."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending and grace_s > 0:
        loop.run_until_complete(asyncio.wait(pending, timeout=grace_s))
        pending = [t for t in pending if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def agree_on_abandoning(stopped_here: bool) -> None:
    """After each rollout, on every process (a collective): raise StepAbandoned everywhere when the
    rollout was abandoned on any process, so no process goes on into the step's collectives alone."""
    if sum_over_processes(1.0 if stopped_here else 0.0) > 0:
        raise StepAbandoned(f"stopped by {stop_requested() or 'a signal on another process'} during the rollout")
