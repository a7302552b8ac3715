"""Public types of the sandbox (contract in DESIGN.md). Implementation lives beside this file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union


@dataclass
class SandboxConfig:
    timeout_s: float = 10.0
    """Wall seconds one cell may run, not counting time spent waiting on host sub-calls
    (those are bounded by the RLM budget and the client timeouts)."""
    memory_mb: int = 2048
    """Memory the worker may allocate beyond the (shared) context."""
    max_output_chars: int = 20_000
    """stdout+stderr kept per cell; the rest is cut with a note saying how much."""
    max_processes: int = 16
    """Processes/threads the worker may create (fork bombs stop here)."""
    cpu_time_s: float = 120.0
    """CPU seconds a session's worker may use in total."""
    max_file_mb: int = 64
    """Largest file the worker may write in its private temp dir."""
    max_parallel_subcalls: int = 32
    """How many sub-calls of one llm_query_batched run at once on the host."""


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
    subcall_wait_s: float = 0.0  # wall time the cell spent blocked on host sub-calls (not in timeout_s)


class SubcallHandler(Protocol):
    """Host side of the worker's sub-model functions. Called from the session's thread."""

    def llm_batch(self, prompts: list[str]) -> list[str]: ...

    def rlm_batch(self, requests: list[tuple[str, Any]]) -> list[str]:
        """(prompt, context-or-None) pairs from rlm_query; one child RLM each."""
        ...


# What REPLSession(llm=...) accepts: a plain `fn(prompt) -> str`, a SubcallHandler, or None.
LLMArg = Union[Callable[[str], str], SubcallHandler, None]
