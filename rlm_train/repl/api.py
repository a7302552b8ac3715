"""Public types of the sandbox (docs/architecture.md describes the sandbox). Implementation lives beside this file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union


# The floor for memory_mb. A fresh worker's group is charged little (its pages are shared
# copy-on-write) and the cgroup limit adds cgroups.MEMORY_SLACK_MB on top; below this,
# ordinary cells (a compiled regex, a list of a few thousand strings) have no room.
MIN_MEMORY_MB = 32


class SandboxError(RuntimeError):
    """A sandbox could not be started (fork-server lost, worker failed to come up)."""


@dataclass
class SandboxConfig:
    """The sandbox's limits. Also a recipe section (`rlm.sandbox`): pydantic validates it
    there, and unknown keys are errors (`__pydantic_config__`, a plain dict here so the
    worker never imports pydantic)."""

    __pydantic_config__ = {"extra": "forbid"}

    timeout_s: float = 30.0
    """Wall seconds one cell may run, not counting the time the sub-model takes to answer its
    sub-calls (bounded by the RLM budget and the client timeouts); the host checking a
    request counts."""
    memory_mb: int = 2048
    """Memory the session may allocate beyond the (shared) context: every process of it,
    with tmpfs and memfd files (cgroup); per process (RLIMIT_AS) where cgroups are missing."""
    max_output_chars: int = 20_000
    """stdout+stderr kept per cell; the rest is cut with a note saying how much."""
    max_processes: int = 16
    """Processes/threads the session may have at once (fork bombs stop here)."""
    cpu_time_s: float = 120.0
    """CPU seconds the session may use in total, all its processes together."""
    max_cpus: float = 1.0
    """CPU cores the session's processes may keep busy at once (cgroup cpu quota)."""
    max_file_mb: int = 64
    """Size of the private /tmp (and so the largest file the worker may write)."""
    max_message_mb: int = 32
    """Largest frame the worker may send the host (a sub-call's prompts and contexts);
    a bigger one is a protocol violation: the session restarts."""
    max_final_chars: int = 100_000
    """Longest FINAL answer the host keeps; the rest is cut."""
    allow_background: bool = False
    """Let processes and threads a cell leaves behind run on between cells. Off: its
    processes are killed when the cell ends and the session is frozen until the next."""
    max_parallel_subcalls: int = 32
    """How many sub-calls of one llm_query_batched run at once on the host."""

    def __post_init__(self) -> None:
        checks = [
            ("timeout_s", self.timeout_s > 0, "a positive number of seconds"),
            ("memory_mb", self.memory_mb >= MIN_MEMORY_MB,
             f"at least {MIN_MEMORY_MB} (MB a session needs for ordinary cells)"),
            ("max_output_chars", self.max_output_chars >= 1, "at least 1"),
            ("max_processes", self.max_processes >= 1, "at least 1 (the worker itself)"),
            ("cpu_time_s", self.cpu_time_s > 0, "a positive number of seconds"),
            ("max_cpus", 0.01 <= self.max_cpus <= 1024, "between 0.01 and 1024 cores"),
            ("max_file_mb", self.max_file_mb >= 1, "at least 1"),
            ("max_message_mb", self.max_message_mb >= 1, "at least 1"),
            ("max_final_chars", self.max_final_chars >= 1, "at least 1"),
            ("max_parallel_subcalls", self.max_parallel_subcalls >= 1, "at least 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"SandboxConfig.{name}={getattr(self, name)!r} is impossible: use {need}")

    def worker_settings(self) -> dict:
        """What the worker and the fork-server need (the pool's key): host-only settings
        are left out so they do not split the pool."""
        return {"memory_mb": self.memory_mb, "max_output_chars": self.max_output_chars,
                "max_processes": self.max_processes, "cpu_time_s": self.cpu_time_s, "max_cpus": self.max_cpus,
                "max_file_mb": self.max_file_mb, "allow_background": self.allow_background}


@dataclass
class ExecResult:
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # traceback text (or limit message) when the cell failed
    timed_out: bool = False
    final: str | None = None  # set by FINAL(...) / FINAL_VAR(...) in this cell
    truncated_chars: int = 0  # output characters cut by max_output_chars
    wall_s: float = 0.0
    restarted: bool = False  # the worker died (limit, crash) and the session was restarted
    subcall_wait_s: float = 0.0  # wall time the sub-model took to answer the cell's sub-calls (not in timeout_s)
    # Why the cell failed when the sandbox (not the cell's own code) ended it: "timeout"
    # (timeout_s), "limit" (the session's CPU-time budget), "sandbox" (the worker died or
    # broke the host protocol). None for ordinary cell errors.
    error_kind: str | None = None


class SubcallHandler(Protocol):
    """Host side of the worker's sub-model functions. Blocking methods are called from the
    thread running `execute` (or, under `execute_async`, from a worker thread); `async def`
    ones are awaited on the loop running `execute_async`."""

    def llm_batch(self, prompts: list[str]) -> list[str]: ...

    def rlm_batch(self, requests: list[tuple[str, Any]]) -> list[str]:
        """(prompt, context-or-None) pairs from rlm_query; one child RLM each. A context is
        a `child_context.EncodedContext`: JSON text for the child's REPLSession, which decodes
        it inside the child's sandbox (`.decode()` gives the data where a handler needs it)."""
        ...


# What REPLSession(llm=...) accepts: a plain `fn(prompt) -> str`, a SubcallHandler, or None.
LLMArg = Union[Callable[[str], str], SubcallHandler, None]
