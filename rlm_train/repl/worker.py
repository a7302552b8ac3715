"""The REPL that runs inside a sandboxed worker process.

Reads `exec` frames from the host socket, runs each cell in one persistent
namespace, and answers with a `done` frame. Sub-model calls are request frames
to the host; the cell blocks until the host replies. Everything the cell prints
goes through bounded writers, and fds 1/2 point at a file in the private temp
dir, so subprocess output is captured too and can never reach the protocol socket.
"""

from __future__ import annotations

import builtins
import linecache
import os
import signal
import socket
import sys
import time
import traceback

# Preimported for cells (and imported once in the fork-server, so they are shared pages).
import collections  # noqa: F401
import itertools  # noqa: F401
import json  # noqa: F401
import math  # noqa: F401
import re  # noqa: F401

from rlm_train.repl import child_context, protocol

PROTO_FD = 3  # the host socket lives here; user code closing it just ends the session
FD_OUTPUT = "/tmp/.fd_output"  # where fds 1/2 (os.system, subprocess) land
HELPER_NAMES = ("context", "llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
                "FINAL", "FINAL_VAR", "SHOW_VARS")
PREIMPORTED = {"re": re, "json": json, "math": math, "collections": collections, "itertools": itertools}

# compile() of a source string first checks whether it got an AST, and that builds the
# interpreter's AST node classes on first use (docs/measurements.md). Done here, once, in the
# fork-server, the classes are shared pages instead of being rebuilt by every worker.
compile("pass", "<warm-up>", "exec")


class BoundedWriter:
    """A text stream that keeps the first `limit` chars and counts the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


class Worker:
    def __init__(self, sock: socket.socket, context, max_output_chars: int, allow_background: bool = False):
        self.sock = sock
        self.context = context
        self.max_output_chars = max_output_chars
        self.allow_background = allow_background
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins, **PREIMPORTED}
        self.final: str | None = None
        self.cell_no = 0
        self.pid = os.getpid()
        self.fd_out = os.open(FD_OUTPUT, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)

    # --- sub-calls: one request frame, block for the reply -----------------
    def _subcall(self, op: str, items: list) -> list[str]:
        if os.getpid() != self.pid:
            raise RuntimeError("sub-calls are only available in the REPL process, not in forked children")
        payload = protocol.dumps_frame({"op": op, "items": items})  # TypeError, ValueError: the cell gets them
        try:
            protocol.send_raw(self.sock, payload)
            reply = protocol.recv(self.sock)
        except (OSError, protocol.ProtocolError) as exc:
            raise RuntimeError(f"lost the host channel during {op}: {exc}") from None
        if reply.get("error") is not None:
            raise RuntimeError(reply["error"])
        return reply["results"]

    def llm_query(self, prompt) -> str:
        return self._subcall("llm", [str(prompt)])[0]

    def llm_query_batched(self, prompts) -> list[str]:
        prompts = [str(p) for p in prompts]
        return self._subcall("llm", prompts) if prompts else []

    # A child's context goes as JSON text the host passes on undecoded (child_context.py).
    def rlm_query(self, prompt, context=None) -> str:
        return self._subcall("rlm", [(str(prompt), child_context.encode(context))])[0]

    def rlm_query_batched(self, prompts, contexts=None) -> list[str]:
        prompts = [str(p) for p in prompts]
        contexts = list(contexts) if contexts is not None else [None] * len(prompts)
        if len(contexts) != len(prompts):
            raise ValueError("rlm_query_batched: prompts and contexts differ in length")
        return self._subcall("rlm", [(p, child_context.encode(c)) for p, c in zip(prompts, contexts)]) if prompts else []

    # --- answer helpers ------------------------------------------------------
    def FINAL(self, answer) -> None:
        self.final = str(answer)

    def FINAL_VAR(self, name) -> None:
        if not isinstance(name, str):  # a value was passed: take it as the answer
            self.final = str(name)
            return
        key = name.strip().strip("'\"")
        if key not in self.ns:
            raise NameError(f"FINAL_VAR: variable '{key}' is not defined. "
                            f"Define it in a cell first, or use FINAL(value) to answer directly.")
        self.final = str(self.ns[key])

    def SHOW_VARS(self) -> None:
        rows = [f"{k}: {type(v).__name__}" for k, v in self.ns.items() if self._is_user_var(k, v)]
        print("\n".join(rows) if rows else "(no variables defined yet)")

    def _is_user_var(self, key: str, value) -> bool:
        return not key.startswith("_") and key not in HELPER_NAMES and type(value).__name__ != "module"

    def _inject(self) -> None:
        self.ns.update(context=self.context, llm_query=self.llm_query, llm_query_batched=self.llm_query_batched,
                       rlm_query=self.rlm_query, rlm_query_batched=self.rlm_query_batched,
                       FINAL=self.FINAL, FINAL_VAR=self.FINAL_VAR, SHOW_VARS=self.SHOW_VARS)
        self.ns["__builtins__"] = builtins

    # --- one cell ------------------------------------------------------------
    def run_cell(self, code: str) -> dict:
        self.cell_no += 1
        self.final = None
        self._inject()
        out, err = BoundedWriter(self.max_output_chars), BoundedWriter(self.max_output_chars)
        sys.stdout, sys.stderr = out, err
        error = None
        filename = f"<cell {self.cell_no}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            exec(compile(code, filename, "exec"), self.ns)
        except BaseException as exc:  # SystemExit/KeyboardInterrupt too: the session goes on
            error = "".join(traceback.format_exception(type(exc), exc, _strip_frames(exc.__traceback__)))
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        fd_text, fd_dropped = self._drain_fd_output()
        stdout = out.getvalue() + fd_text
        dropped = out.dropped + err.dropped + fd_dropped
        # The shared budget applies to stdout+stderr together.
        budget = self.max_output_chars
        if len(stdout) > budget:
            dropped += len(stdout) - budget
            stdout = stdout[:budget]
        stderr = err.getvalue()[: max(0, budget - len(stdout))]
        dropped += len(err.getvalue()) - len(stderr)
        if not self.allow_background:
            _stop_leftover_processes()
        return {"op": "done", "stdout": stdout, "stderr": stderr, "error": error,
                "final": self.final, "truncated_chars": dropped}

    def _drain_fd_output(self) -> tuple[str, int]:
        try:
            size = os.fstat(self.fd_out).st_size
            if size == 0:
                return "", 0
            data = os.pread(self.fd_out, min(size, self.max_output_chars * 4), 0)
            os.ftruncate(self.fd_out, 0)
        except OSError:
            return "", 0
        text = data.decode("utf-8", "replace")
        return text, max(0, size - len(data))

    def serve(self) -> None:
        may_spin = protocol.spinning_pays()
        spin = False  # the host's last frame came within SPIN_S of our reply: poll for the next
        replied_at = 0.0
        while True:
            if spin:
                protocol.spin_until_readable(self.sock, protocol.SPIN_S)
            try:
                msg = protocol.recv(self.sock)
            except (OSError, protocol.ProtocolError):
                os._exit(0)  # host went away
            spin = may_spin and time.perf_counter() - replied_at < protocol.SPIN_S
            if msg.get("op") == "exec":
                reply = self.run_cell(msg["code"])
                if os.getpid() != self.pid:
                    os._exit(0)  # a child forked by the cell: it must never speak the protocol
            elif msg.get("op") == "ping":
                reply = {"op": "pong"}
            else:
                reply = {"op": "done", "stdout": "", "stderr": "", "final": None, "truncated_chars": 0,
                         "error": f"unknown op {msg.get('op')!r}"}
            try:
                protocol.send_data(self.sock, reply)
            except OSError:
                os._exit(0)
            replied_at = time.perf_counter()


def _stop_leftover_processes() -> None:
    """Background work is off: the processes a cell started end with it. As pid 1 of its
    pid namespace the worker reaches exactly them with kill(-1); threads it left are
    frozen by the host between cells (cgroup freeze) where the machine allows."""
    if os.getpid() != 1:
        return
    try:  # every process of the namespace descends from pid 1 (orphans are reparented to it)
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return  # no child, so nothing else runs: the common case (kill(-1) walks every process of the host)
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    while True:
        try:
            if os.waitpid(-1, 0)[0] <= 0:
                return
        except ChildProcessError:
            return


def _strip_frames(tb):
    """Hide the worker's own frames: tracebacks start at the cell."""
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next
    return tb


def redirect_std_fds() -> None:
    """fds 0/1/2 -> /dev/null and the capture file, so nothing reaches the protocol socket."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(FD_OUTPUT, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in (null, out):
        if fd > 2:
            os.close(fd)
    # typeshed marks sys.__stdout__ Final; the worker must replace it (cells may use it).
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False)  # type: ignore[misc]


def clean_environment() -> None:
    os.environ.clear()
    os.environ.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME="/tmp", TMPDIR="/tmp", LANG="C.UTF-8")


def run(sock: socket.socket, context, max_output_chars: int, allow_background: bool = False) -> None:
    Worker(sock, context, max_output_chars, allow_background).serve()
    os._exit(0)
