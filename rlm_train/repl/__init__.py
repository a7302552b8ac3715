"""Sandboxed persistent Python REPL (contract in DESIGN.md, "REPL sandbox")."""

from rlm_train.repl.api import ExecResult, LLMArg, SandboxConfig, SubcallHandler
from rlm_train.repl.session import REPLSession, SharedContext, isolation_report, shutdown

__all__ = ["REPLSession", "SandboxConfig", "ExecResult", "SubcallHandler", "LLMArg", "SharedContext",
           "isolation_report", "shutdown"]
