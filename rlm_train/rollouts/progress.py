"""What a generation run shows while it runs, and how it stops on SIGINT / SIGTERM.

`Progress` is the bar: episodes done with rate and ETA, plus the signs of life that come
before an episode finishes (root turns done, tokens arriving and their rate), so a run
whose episodes each take minutes does not sit at 0/N with no sign that anything happens.

`StopOnSignals`: the first SIGINT or SIGTERM cancels the run's main task. Episodes in
flight are dropped (not recorded, so a re-run of the same command runs them again), their
sandboxes are killed, and the caller writes its summary and raises `Stopped`. A second
signal stops the process at once, unless it comes within SAME_REQUEST_S of the first
(`SignalRepeats`): then it is the same request, delivered twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import threading
import time
from typing import Callable

from rlm_train.records import Outcome, TrajectoryRecord, TurnRecord


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal; what finished is saved and a re-run resumes."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# A second stop signal this soon after the first is the same request delivered twice: scancel signals
# every process of a job while torchrun passes its own signal on to its ranks, and a terminal's Ctrl-C
# reaches a launcher and the processes it started alike. One later means "stop at once".
SAME_REQUEST_S = 5.0


class SignalRepeats:
    """When the first stop signal came, to tell a repeat of it (within `window_s`) from a second request."""

    def __init__(self, window_s: float = SAME_REQUEST_S) -> None:
        self.window_s = window_s
        self.first_at: float | None = None

    def first(self) -> None:
        self.first_at = time.monotonic()

    def is_repeat(self) -> bool:
        return self.first_at is not None and time.monotonic() - self.first_at < self.window_s


class StopOnSignals:
    def __init__(self, repeats: SignalRepeats | None = None) -> None:
        self.signum: int | None = None
        self.repeats = repeats or SignalRepeats()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, task: asyncio.Task) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread; elsewhere the caller stops us
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._on_signal, sig, task)

    def remove(self) -> None:
        if self._loop is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def _on_signal(self, sig: int, task: asyncio.Task) -> None:
        if self.signum is not None:
            if self.repeats.is_repeat():
                return  # the first one's twin: already stopping
            signal.signal(sig, signal.SIG_DFL)  # a second request: no more waiting
            os.kill(os.getpid(), sig)
            return
        self.signum = sig
        print(f"\n{signal.Signals(sig).name}: stopping (episodes in flight are dropped; send it again, after "
              f"{self.repeats.window_s:g} s, to quit now)",
              file=sys.stderr, flush=True)
        self.repeats.first()
        task.cancel()


class Progress:
    """tqdm bar with rate and ETA, the running mean score, root turns and tokens."""

    def __init__(self, total: int, resumed: int, enabled: bool, desc: str = "generate",
                 live_tokens: Callable[[], int] | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="ep", file=sys.stderr, disable=not enabled,
                        mininterval=0.5, smoothing=0.05, dynamic_ncols=True)
        self.enabled = enabled
        self.scores: list[float] = []
        self.errors = 0
        self.turns = 0
        self.turn_tokens = 0  # completion tokens of finished root turns
        self.live_tokens = live_tokens  # tokens streamed so far by the run's policies (sub-calls too)
        self.started = time.monotonic()
        self.shown = 0.0
        if resumed:
            self.bar.write(f"resuming: {resumed} episodes already recorded, {total} to go", file=sys.stderr)

    def turn(self, turn: TurnRecord) -> None:
        self.turns += 1
        self.turn_tokens += turn["completion_tokens"]
        self.tick()

    def update(self, record: TrajectoryRecord) -> None:
        score = record.get("score")
        if score is not None:
            self.scores.append(score)
        if record["outcome"] == Outcome.ERROR:
            self.errors += 1
        self._postfix()
        self.bar.update(1)

    def tick(self) -> None:
        """Redraw at most twice a second, even when no episode finished."""
        if self.enabled and time.monotonic() - self.shown >= 0.5:
            self._postfix()
            self.bar.refresh()

    def tokens(self) -> int:
        live = self.live_tokens() if self.live_tokens is not None else 0
        return max(live, self.turn_tokens)

    def _postfix(self) -> None:
        self.shown = time.monotonic()
        mean = f"{statistics.fmean(self.scores):.3f}" if self.scores else "-"
        tokens = self.tokens()
        rate = tokens / max(self.shown - self.started, 1e-9)
        self.bar.set_postfix_str(f"score={mean} errors={self.errors} turns={self.turns} "
                                 f"tokens={tokens:,} ({rate:,.0f}/s)", refresh=False)

    def close(self) -> None:
        self.bar.close()


def streamed_tokens(*policies: object) -> Callable[[], int]:
    """A live count of the tokens the given policies have streamed (openai: policies count them)."""
    unique = list({id(p): p for p in policies if p is not None}.values())

    def count() -> int:
        stats = [getattr(p, "stats", None) for p in unique]
        return sum(int(s.get("streamed_tokens", 0)) for s in stats if isinstance(s, dict))

    return count
