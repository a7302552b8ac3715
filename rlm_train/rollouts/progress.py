"""What a generation run shows while it runs, and how it stops on SIGINT / SIGTERM.

`Progress` is the bar: episodes done with rate and ETA, plus the signs of life that come
before an episode finishes (root turns done, tokens arriving and their rate), so a run
whose episodes each take minutes does not sit at 0/N with no sign that anything happens.
On a terminal it is a tqdm bar; where stderr is not one (a Slurm log, a pipe, a file) it is
one plain line every `every_s` seconds instead, since a bar's carriage-return redraws pile
up there as one endless line.

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
from typing import Callable, TextIO

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
    """Episodes done, rate, ETA, the running mean score, root turns and tokens: a tqdm bar on a
    terminal, a plain line every `every_s` seconds elsewhere (`plain`)."""

    def __init__(self, total: int, resumed: int, enabled: bool, desc: str = "generate",
                 live_tokens: Callable[[], int] | None = None, every_s: float = 30.0,
                 stream: TextIO | None = None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.plain = enabled and not _is_terminal(self.stream)
        self.bar = tqdm(total=total, desc=desc, unit="ep", file=self.stream, disable=not enabled or self.plain,
                        mininterval=0.5, smoothing=0.05, dynamic_ncols=True)
        self.enabled = enabled
        self.desc = desc
        self.total = total
        self.done = 0
        self.every_s = every_s
        self.scores: list[float] = []
        self.errors = 0
        self.turns = 0
        self.turn_tokens = 0  # completion tokens of finished root turns
        self.live_tokens = live_tokens  # tokens streamed so far by the run's policies (sub-calls too)
        self.started = time.monotonic()
        self.shown = 0.0
        self.line_at = self.started  # when the last plain line was written
        self.line_done = 0  # and the count it showed
        if resumed:  # said even with progress off: a resume should never be silent
            self._write(f"resuming: {resumed} episodes already recorded, {total} to go")
        if self.plain:
            self._write(self.line())

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
        self.done += 1
        if self.plain:
            self.tick()
            return
        self._postfix()
        self.bar.update(1)

    def tick(self) -> None:
        """Redraw the bar at most twice a second, even when no episode finished; without a
        terminal, write a line every `every_s` seconds."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.plain:
            if now - self.line_at >= self.every_s:
                self.line_at, self.line_done = now, self.done
                self._write(self.line())
        elif now - self.shown >= 0.5:
            self._postfix()
            self.bar.refresh()

    def tokens(self) -> int:
        live = self.live_tokens() if self.live_tokens is not None else 0
        return max(live, self.turn_tokens)

    def stats(self) -> str:
        """score=... errors=... turns=... tokens=... (rate/s): what follows the count on both displays."""
        self.shown = time.monotonic()
        mean = f"{statistics.fmean(self.scores):.3f}" if self.scores else "-"
        tokens = self.tokens()
        rate = tokens / max(self.shown - self.started, 1e-9)
        return f"score={mean} errors={self.errors} turns={self.turns} tokens={tokens:,} ({rate:,.0f}/s)"

    def line(self) -> str:
        """`generate: 12/100 episodes (12%), 2m05s, 0.10 ep/s, ETA 14m40s; score=...`: one plain line."""
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = format_duration(left / rate) if rate > 0 else ("0s" if left == 0 else "?")
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"{self.desc}: {self.done}/{self.total} episodes{percent}, {format_duration(elapsed)}, "
                f"{rate:.2f} ep/s, ETA {eta}; {self.stats()}")

    def _postfix(self) -> None:
        self.bar.set_postfix_str(self.stats(), refresh=False)

    def _write(self, text: str) -> None:
        if self.plain:
            print(text, file=self.stream, flush=True)
        else:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        if self.plain and self.done != self.line_done:
            self._write(self.line())  # the last count, whatever the interval
        self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m05s", 125 -> "2m05s", 7.2 -> "7s"."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def streamed_tokens(*policies: object) -> Callable[[], int]:
    """A live count of the tokens the given policies have streamed (openai: policies count them)."""
    unique = list({id(p): p for p in policies if p is not None}.values())

    def count() -> int:
        stats = [getattr(p, "stats", None) for p in unique]
        return sum(int(s.get("streamed_tokens", 0)) for s in stats if isinstance(s, dict))

    return count
