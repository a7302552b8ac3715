"""A graceful stop on SIGTERM / SIGINT for training runs (SFT and GRPO): the first signal asks the
trainer to finish the step it is on, write a checkpoint and leave its loop, so the next run with
`resume: auto` continues from there; a second signal stops at once (the handler is put back).

Every process must agree on the step it stops at, or one would wait forever in a collective for the
others: the flag is combined over processes at each step's end (one scalar all-reduce)."""

from __future__ import annotations

import signal
from typing import Any

from rlm_train.train.common import main_print, sum_over_processes


class GracefulStop:
    """Install with `with GracefulStop(stage) as stop:`, add `stop.callback()` to the trainer;
    `stop.signal_name` is set when training ended because of a signal."""

    def __init__(self, stage: str):
        self.stage = stage
        self.requested: str | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # second signal: the user means it
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt(name)
        self.requested = name
        main_print(f"[{self.stage}] {name}: stopping after this step with a checkpoint "
                   f"(the next run resumes from it; send it again to stop at once)")

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
