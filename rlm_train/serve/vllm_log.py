"""The line of vLLM's log that says why it died.

vLLM's API server, its engine core and its workers are separate processes: when the engine
fails to start, the log holds the engine's traceback (the cause), then the API server's own
("RuntimeError: Engine core initialization failed. See root cause above."), so its last lines
name no cause. `root_cause` finds the first exception line that is not such a wrapper, else the
first ERROR line.
"""

from __future__ import annotations

import re

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "ValueError: ...", "torch.OutOfMemoryError: ...", "(EngineCore_DP0 pid=7) ValueError: ..."
_EXCEPTION_RE = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (\S.*)")
_ERROR_LEVEL_RE = re.compile(r"\b(?:ERROR|CRITICAL|FATAL)\b")
# Lines that point at the cause instead of naming it.
_WRAPPERS = ("See root cause above", "Engine core initialization failed", "EngineCore failed to start",
             "Traceback (most recent call last)", "The above exception was the direct cause")


def root_cause(log_text: str, width: int = 400) -> str | None:
    """The first line of `log_text` that names why vLLM died (module docstring), cut to `width`."""
    lines = [_ANSI_RE.sub("", line).strip() for line in log_text.splitlines()]
    lines = [line for line in lines if line and not any(w in line for w in _WRAPPERS)]
    found = next((m.group(0) for m in map(_EXCEPTION_RE.search, lines) if m), None) or \
        next((line for line in lines if _ERROR_LEVEL_RE.search(line)), None)
    if found is None:
        return None
    return found if len(found) <= width else found[: width - 3] + "..."
