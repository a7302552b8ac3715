"""Background `serve` stages: started when a stage that needs them must run, waited for until
GET /health answers, and stopped (SIGTERM to the process group, then SIGKILL) after the last
stage that needs them, on an error and on Ctrl-C, so nothing is left running.

The serve command itself stops vLLM's own process group on SIGTERM (rlm_train.serve), so
signalling the serve process's group reaches everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from rlm_train.errors import UserError
from rlm_train.pipeline.recipe import PipelineStage

# Seconds the serve command may spend on its own checks (tokenizer, adapters) before vLLM starts,
# on top of vllm.start_timeout_s. The serve command itself gives up start_timeout_s after vLLM starts
# (and exits naming vLLM's last log line); this bound is the backstop for a serve that hangs.
CHECKS_MARGIN_S = 60.0


def health_url(stage: PipelineStage) -> str:
    vllm = stage.config.vllm
    host = vllm.host or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "::1") else host)
    return f"http://{host}:{vllm.port}/health"


def check_background_stage(stage: PipelineStage, where: str) -> None:
    """A background serve stage must have a model and a fixed port, or nothing can wait for it."""
    vllm = stage.config.vllm
    if not vllm.model:
        raise UserError(f"{where}: stage {stage.name}: a background serve stage needs vllm.model (what to serve)")
    if vllm.port == 0:
        raise UserError(f"{where}: stage {stage.name}: vllm.port 0 (a free port) cannot be found by the stages "
                        "that use it; set a fixed port, the one their base_urls name")


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send `sig` to the child when the pipeline process dies
    (even by SIGKILL), so a killed pipeline leaves no stage or server running. Linux only."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    return preexec


def group_gone(pgid: int) -> bool:
    from rlm_train.serve.launcher import group_alive

    return not group_alive(pgid)


def stop_group(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    """`first` (a signal) to the process group, then SIGKILL to whatever is left after `grace_s`;
    returns when no process of the group is left (or 10 s after SIGKILL)."""
    pgid = proc.pid
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and group_gone(pgid):
                return
            time.sleep(0.1)
    proc.poll()


def last_log_line(path: Path) -> str:
    from rlm_train.serve.launcher import last_line

    return last_line(path, 300) or "(its log is empty)"


class BackgroundServer:
    """One background serve stage's process: `rlm-train serve --recipe ...`, output to a log."""

    def __init__(self, stage: PipelineStage, log_file: Path, command: list[str]):
        self.stage = stage
        self.log_file = log_file
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.started_wall = 0.0
        self.healthy_after_s: float | None = None

    @property
    def url(self) -> str:
        return health_url(self.stage)

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        self.started_at = time.monotonic()
        self.started_wall = time.time()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, ValueError):
            return False

    @property
    def vllm_log(self) -> Path:
        """vLLM's own log (vllm.log_file, else the serve command's default for the port)."""
        vllm = self.stage.config.vllm
        if vllm.log_file:
            return Path(vllm.log_file).expanduser()
        from rlm_train.models.loading import cache_root

        return cache_root() / "serve" / f"vllm-{vllm.port}.log"

    def last_words(self) -> str:
        """`last line of its log (FILE): LINE`, from vLLM's log once this run's vLLM wrote it (it
        says why vLLM is not up), else from the serve command's output."""
        log = self.vllm_log
        try:
            fresh = log.stat().st_mtime >= self.started_wall and log.stat().st_size > 0
        except OSError:
            fresh = False
        chosen = log if fresh else self.log_file
        return f"last line of its log ({chosen}): {last_log_line(chosen)}"

    def died(self) -> str:
        """A one-line reason when the server process has exited, else ''."""
        if self.proc is None or self.proc.poll() is None:
            return ""
        return f"background stage {self.stage.name}: the server exited with status {self.proc.returncode}; {self.last_words()}"

    def wait_healthy(self, timeout_s: float, stop_requested: Callable[[], bool],
                     progress: Callable[[float, str], None]) -> None:
        """Return when GET /health answers 200; UserError (one line, the stage and the last log
        line) when the process dies or `timeout_s` passes. Returns early if `stop_requested()`."""
        while True:
            elapsed = time.monotonic() - self.started_at
            if stop_requested():
                return
            if (reason := self.died()):
                raise UserError(reason)
            if self.healthy():
                self.healthy_after_s = elapsed
                return
            if elapsed > timeout_s:
                raise UserError(f"background stage {self.stage.name}: {self.url} did not answer within {timeout_s:.0f} s "
                                f"(raise vllm.start_timeout_s); {self.last_words()}")
            progress(elapsed, self.last_words())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        # The serve command needs vllm.stop_timeout_s to stop vLLM's group itself; then some slack.
        stop_group(self.proc, signal.SIGTERM, self.stage.config.vllm.stop_timeout_s + 15.0)

    def up_seconds(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0


def serve_command(stage: PipelineStage) -> list[str]:
    return [sys.executable, "-m", "rlm_train.cli", *stage.argv]


def start_timeout(stage: PipelineStage) -> float:
    return stage.config.vllm.start_timeout_s + CHECKS_MARGIN_S
