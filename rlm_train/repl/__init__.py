"""Sandboxed persistent Python REPL (contract and process tree: docs/architecture.md, "The sandbox's process tree").

The names below load on first use (PEP 562): the fork-server imports this package
too (for forkserver, worker, sandbox, protocol), and the host-side modules
(session: subprocess, threading, logging, concurrent.futures, dataclasses...) would
add heap to it, which every worker then maps, faults on and tears down (docs/measurements.md)."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not `from typing import ...`: typing alone would grow the fork-server

_EXPORTS = {"ExecResult": "api", "LLMArg": "api", "SandboxConfig": "api", "SubcallHandler": "api",
            "REPLSession": "session", "SharedContext": "client", "isolation_report": "session",
            "shutdown": "client"}

__all__ = ["REPLSession", "SandboxConfig", "ExecResult", "SubcallHandler", "LLMArg", "SharedContext",
           "isolation_report", "shutdown"]

if TYPE_CHECKING:
    from rlm_train.repl.api import ExecResult, LLMArg, SandboxConfig, SubcallHandler
    from rlm_train.repl.client import SharedContext, shutdown
    from rlm_train.repl.session import REPLSession, isolation_report


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
