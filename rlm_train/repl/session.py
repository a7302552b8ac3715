"""Host side of the sandbox: REPLSession and the isolation report.

Thread safety: many sessions may run `execute` at once from different threads
(the RLM loop uses asyncio.to_thread). Each session is used by one thread at a
time. Workers come from the fork-server and zygotes (client.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import reprlib
import select
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable, cast

from rlm_train.repl import cgroup_host, child_context, client, protocol
from rlm_train.repl.api import ExecResult, LLMArg, SandboxConfig, SandboxError, SubcallHandler
from rlm_train.repl.client import START_TIMEOUT_S, ForkServer, Zygote, acquire_zygote, get_server, pool_payload, release_zygote

log = logging.getLogger(__name__)

READY_MAX_BYTES = 1 << 20
MAX_BATCH = 10_000  # prompts in one sub-call frame
# Layers the contract promises, and what is weaker without each; a layer that is False in
# a worker's report is named in the one-line warning.
LAYERS = {
    "net_namespace": "cells can reach the host's network",
    "mount_namespace": "cells share the host's mounts",
    "pid_namespace": "cells see host processes",
    "minimal_root": "cells can read world-readable host files and reach host unix sockets",
    "private_tmp": "cells write into the host's /tmp",
    "private_dev": "cells can open host devices (/dev/ptmx)",
    "private_proc": "cells read the host's /proc",
    "uid_drop": "cells run as the host's user",
    "no_new_privs": "setuid programs can raise privileges",
    "seccomp": "cells can make namespaces, use io_uring, bpf, ptrace, any socket family",
    "session_keyring": "kernel keys can pass between sessions",
    "cgroup_memory": "memory is bounded per process only, tmpfs and memfd not at all",
    "cgroup_pids": "processes are bounded per uid only",
    "cgroup_cpu": "a session may keep every core busy",
    "cgroup_cpu_time": "CPU time is bounded per process only",
    "cgroup_freeze": "threads a cell leaves behind run between cells",
}
EXPECTED_LAYERS = tuple(LAYERS)
# Cells running in this process now. A host thread polls for its cell's reply only while
# it is the only one: with several sessions busy (a generation run) the cores are better
# left to their workers and to the event loop.
_running_cells = 0
_running_lock = threading.Lock()


def _no_cells_after_fork() -> None:
    """A forked host (a DataLoader worker) runs none of its parent's cells, and must not
    inherit the lock held by a parent thread at the fork."""
    global _running_cells, _running_lock
    _running_cells, _running_lock = 0, threading.Lock()


os.register_at_fork(after_in_child=_no_cells_after_fork)
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 60, 60, 3


# --------------------------------------------------------------------------- isolation report
_report: dict | None = None
_report_lock = threading.Lock()


def weakness_line(report: dict) -> str | None:
    """One line naming every missing layer, what is weaker without it, and why it is
    missing where the report says; None when nothing is."""
    missing = [k for k in EXPECTED_LAYERS if not report.get(k)]
    if not missing:
        return None
    why = "; ".join(f"{k}: {str(v)[:120]}" for k, v in report.items() if k.endswith("_error") and v)
    parts = ", ".join(f"{k} ({LAYERS[k]})" for k in missing)
    return f"REPL sandbox is WEAKER than the contract on this machine: missing {parts}" + (f" [{why}]" if why else "")


def disable_layers(layers: tuple[str, ...] = ()) -> None:
    """Benchmarks only: restart the fork-server without some layers ("cgroups",
    "minimal_root", "seccomp") to price each; () puts every layer back."""
    global _report
    client.shutdown()
    client._disabled_layers = tuple(layers)
    _report = None


def _note_report(report: dict) -> None:
    global _report
    if report.get("disabled_layers"):
        return  # left out on purpose (a bench): not a weakness of this machine
    with _report_lock:
        if _report is not None:
            return
        _report = {**report, "missing": [k for k in EXPECTED_LAYERS if not report.get(k)]}
    line = weakness_line(report)
    if line:
        log.warning("%s", line)


def isolation_report() -> dict:
    """What the sandbox enforces on this machine (starts a probe session if none ran yet)."""
    if _report is None:
        with REPLSession("") as s:
            s.execute("pass")
    return dict(_report or {})


# --------------------------------------------------------------------------- session
def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _clip(text, limit: int) -> str:
    """A string the worker sent, cut to what the host keeps."""
    if not isinstance(text, str):
        return ""
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} characters cut by the host]"


class _OverCPU(Exception):
    """The session used more CPU time than cpu_time_s (args: the seconds it used)."""


class REPLSession:
    """A persistent sandboxed Python namespace (see docs/architecture.md).

    `timeout_s` bounds the wall time of each cell *excluding* the time the sub-model
    takes to answer its sub-calls (llm_query & co.; the host checking a request counts,
    and the session is frozen or its CPU time watched while it waits). When a cell breaks a
    limit, kills its worker or breaks the host protocol, the result says so with
    `restarted=True` and `error_kind`; the next `execute` runs in a fresh worker with
    an empty namespace. Nothing the worker sends is trusted: frames are size-capped
    before they are read, their values counted before they are decoded, decoded as
    plain data, and every string is clipped here.
    """

    def __init__(self, context: Any = None, config: SandboxConfig | None = None, llm: LLMArg = None):
        self.context = context
        self.config = config or SandboxConfig()
        self.llm = llm
        self.pid: int | None = None  # the worker as the host sees it
        self.zygote_pid: int | None = None
        self.isolation: dict = {}
        self.start_s = 0.0
        self._sock: socket.socket | None = None
        self._status_r = -1
        self._poll: select.poll | None = None  # the worker's channel and status pipe, registered once
        self._pidfd = -1
        self._uid: int | None = None
        self._zygote: Zygote | None = None
        self._server: ForkServer | None = None
        self._control: cgroup_host.SessionControl | None = None
        self._closed = False
        # Poll for the `done` frame (protocol.SPIN_S) while this session's cells come back that fast.
        self._may_spin = protocol.spinning_pays()
        self._spin = False
        self._start()

    # --- lifecycle -------------------------------------------------------------
    def _start(self) -> None:
        t0 = time.perf_counter()
        server = get_server()
        self._server = server
        # An rlm_query context (JSON text) always goes to a pooled worker, which decodes it itself.
        encoded = isinstance(self.context, child_context.EncodedContext)
        payload = protocol.dumps(self.context) if encoded else pool_payload(self.context)
        for attempt in range(2):
            try:
                self._spawn(server, payload)
                break
            except BaseException as exc:  # whatever failed, its uid, descriptors and zygote go back
                self._kill()
                if attempt == 1 or not isinstance(exc, RuntimeError):
                    raise
        self.start_s = time.perf_counter() - t0

    def _spawn(self, server: ForkServer, payload: bytes | None) -> None:
        """Claim a worker (small context: from the fork-server's pool; else from the
        context's zygote) and wait for it outside every shared lock."""
        config = self.config.worker_settings()
        if payload is not None:
            reply, fds = server.claim(config)
            self.zygote_pid = server.pid  # the process this worker tree was forked from
        else:
            self._zygote = acquire_zygote(self.context, server)
            reply, fds = self._zygote.spawn(config)
            self.zygote_pid = self._zygote.pid
        self._uid = reply["uid"]
        sock_fd, status_r, pidfd = fds
        self._status_r, self._pidfd = status_r, pidfd
        self._sock = socket.socket(fileno=sock_fd)
        self._poll = select.poll()
        self._poll.register(sock_fd, select.POLLIN)
        self._poll.register(status_r, select.POLLIN)
        self.pid = reply["pid"]
        deadline = time.monotonic() + START_TIMEOUT_S
        try:  # a pooled or spare worker said `ready` long ago: this frame is already waiting
            ready = protocol.recv_data(self._sock, max_bytes=READY_MAX_BYTES, deadline=deadline)
            if not isinstance(ready, dict) or not isinstance(ready.get("isolation"), dict):
                raise protocol.ProtocolError("the worker's first frame is not `ready`")
            if payload is not None:
                protocol.send_raw(self._sock, payload, deadline=deadline)
            loaded = (protocol.recv_data(self._sock, max_bytes=READY_MAX_BYTES, deadline=deadline)
                      if isinstance(self.context, child_context.EncodedContext) else {"op": "loaded"})
        except (protocol.ProtocolError, OSError) as exc:
            raise SandboxError(f"REPL worker failed to start: {exc}; {self._death_note()}") from None
        if not isinstance(loaded, dict) or loaded.get("op") != "loaded":
            why = loaded.get("error") if isinstance(loaded, dict) else None
            raise SandboxError(_clip(why, 500) if isinstance(why, str) else "the worker's answer to its context is not `loaded`")
        self.isolation = ready["isolation"]
        _note_report(self.isolation)
        if server.root and server.cgroup_paths:
            cap = self.config.max_cpus if self.isolation.get("cgroup_cpu") else None  # the quota bounds CPU time
            self._control = cgroup_host.SessionControl(server.cgroup_paths, server.pid, self._uid, cpu_cap=cap)
            self._freeze()

    def _freeze(self) -> None:
        """Between cells nothing of the session runs, unless background work is allowed."""
        if self._control is not None and not self.config.allow_background:
            self._control.freeze_soon()

    def _kill(self) -> None:
        """SIGKILL the worker (its pid namespace goes with it), wait, release everything."""
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self._pidfd)
            self._pidfd = -1
        if self._control is not None:
            self._control.close()  # thaws: frozen v2 tasks die on SIGKILL anyway, thawed ones sooner
            self._control = None
        self._poll = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        reaped = True
        if self._status_r >= 0:
            # The worker's parent writes the status (or closes the pipe) once it has reaped the
            # worker: after this nothing of the session is left.
            reaped = bool(protocol.wait_ready([self._status_r], 5.0))
            os.close(self._status_r)
            self._status_r = -1
        if self._uid is not None and self._server is not None:
            if reaped:
                self._server.give_uid(self._uid)
            else:  # never hand a uid to a new session while a process may still run under it
                log.warning("REPL worker %s was not confirmed reaped within 5 s; retiring uid %s", self.pid, self._uid)
            self._uid = None
        if self._zygote is not None:
            release_zygote(self._zygote)
            self._zygote = None
        self.pid = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._kill()

    def __enter__(self) -> "REPLSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- cells ---------------------------------------------------------------
    def execute(self, code: str) -> ExecResult:
        global _running_cells
        if self._closed:
            raise RuntimeError("REPLSession is closed")
        with _running_lock:
            _running_cells += 1
        try:
            return self._execute(code)
        finally:
            with _running_lock:
                _running_cells -= 1

    def _execute(self, code: str) -> ExecResult:
        restarted_before = False
        if self._sock is None:  # the previous cell killed the worker: fresh namespace
            self._start()
            restarted_before = True
        sock = self._sock
        assert sock is not None  # _start() connects or raises
        t0 = time.monotonic()
        waited = 0.0
        timeout = self.config.timeout_s
        try:
            self._send_to_worker(sock, {"op": "exec", "code": code}, t0 + timeout)
            while True:
                left = timeout - (time.monotonic() - t0 - waited)
                msg = self._next_frame(sock, left)
                op = msg.get("op")
                if op == "done":
                    self._spin = self._may_spin and time.monotonic() - t0 < protocol.SPIN_S
                    return self._finish_cell(msg, t0, waited, restarted_before)
                if op in ("llm", "rlm"):
                    reply, answering = self._serve_subcall(op, msg.get("items"), t0, waited)
                    waited += answering
                    left = timeout - (time.monotonic() - t0 - waited)
                    self._send_to_worker(sock, reply, time.monotonic() + max(left, 0.05))
                    continue
                raise protocol.ProtocolError(f"unexpected frame op {_short.repr(op)}")
        except protocol.FrameTimeout:
            return self._fail(f"TimeoutError: the cell ran longer than timeout_s={timeout:g}s "
                              f"(time the sub-model took to answer excluded); the worker was killed",
                              t0, waited, "timeout", timed_out=True)
        except _OverCPU as over:
            return self._fail(f"CPUTimeExceeded: the session used {over.args[0]:.1f} CPU seconds, over "
                              f"cpu_time_s={self.config.cpu_time_s:g}; the worker was killed", t0, waited, "limit")
        except protocol.PeerClosed:
            return self._fail(f"WorkerDied: the REPL worker {self._death_note()}", t0, waited, "sandbox")
        except (protocol.ProtocolError, OSError) as exc:
            return self._fail(f"ProtocolError: the worker broke the host protocol ({str(exc)[:300]}); it was killed",
                              t0, waited, "sandbox")

    def _send_to_worker(self, sock: socket.socket, frame: dict, deadline: float) -> None:
        """A cell or a sub-call's answer. A frozen session gets the frame queued before the
        thaw, so the worker wakes once, to find it waiting."""
        if self._control is not None:
            protocol.send_in_two_steps(sock, frame, deadline, between=self._control.thaw)
        else:
            protocol.send(sock, frame, deadline=deadline)

    def _check_cpu(self) -> None:
        """_OverCPU when the session has used more than cpu_time_s (read only when it can have)."""
        used = self._control.over_budget(self.config.cpu_time_s) if self._control is not None else None
        if used is not None:
            raise _OverCPU(used)

    def _next_frame(self, sock: socket.socket, left: float) -> dict:
        if left <= 0 or self._poll is None:
            raise protocol.FrameTimeout("cell timeout")
        polled = self._spin and _running_cells == 1 and protocol.spin_until_readable(sock, protocol.SPIN_S)
        if not polled:  # nothing yet: sleep until the worker's frame, its death, or the cell clock
            # poll on fds registered once per session: half what select() costs per frame here
            ready = self._poll.poll(min(math.ceil(left * 1000), 2**31 - 1))
            if not ready:
                raise protocol.FrameTimeout("cell timeout")
            if sock.fileno() not in [fd for fd, _ in ready]:
                raise protocol.PeerClosed("worker exited")  # its parent reported its death
        msg = protocol.recv_data(sock, max_bytes=self.config.max_message_mb << 20,
                                 deadline=time.monotonic() + max(left, 0.05))
        if not isinstance(msg, dict):
            raise protocol.ProtocolError(f"frame is a {type(msg).__name__}, not an object")
        return msg

    def _finish_cell(self, msg: dict, t0: float, waited: float, restarted: bool) -> ExecResult:
        self._check_cpu()
        self._freeze()
        return self._result(msg, time.monotonic() - t0, waited, restarted)

    def _death_note(self) -> str:
        """How the worker died, from the status pipe its parent writes. A worker that only
        closed its end of the channel is still running: after a short grace it is killed
        here, so the cell returns at once instead of waiting for an exit that never comes."""
        if self._status_r < 0:
            return "stopped answering"
        if not protocol.wait_ready([self._status_r], 0.2):
            if self._pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not protocol.wait_ready([self._status_r], 5.0):
                return "stopped answering"
            return "closed the host channel while still running (it was killed)"
        data = os.read(self._status_r, 4)
        if len(data) != 4:
            return "died (its parent process is gone)"
        (status,) = struct.unpack("<i", data)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            hints: dict[int, str] = {signal.SIGKILL: " (a limit or a kill)", signal.SIGXCPU: " (CPU time limit)",
                                     signal.SIGSEGV: " (crash)"}
            hint = hints.get(sig, "")
            return f"was killed by {_signame(sig)}{hint}"
        return f"exited with code {os.WEXITSTATUS(status)}"

    def _fail(self, why: str, t0: float, waited: float, kind: str, timed_out: bool = False) -> ExecResult:
        self._kill()
        return ExecResult(error=f"{why}. The namespace was lost; the next execute starts a fresh worker.",
                          timed_out=timed_out, wall_s=time.monotonic() - t0, restarted=True,
                          subcall_wait_s=waited, error_kind=kind)

    def _result(self, msg: dict, wall: float, waited: float, restarted: bool) -> ExecResult:
        limit = self.config.max_output_chars
        cut = msg.get("truncated_chars")
        cut = cut if type(cut) is int and 0 <= cut < 1 << 62 else 0  # not a bool, not a float
        stdout = _clip(msg.get("stdout"), limit)
        if cut:
            stdout += f"\n[... output truncated: {cut} characters cut (max_output_chars={limit})]"
        error = msg.get("error")
        final = msg.get("final")
        return ExecResult(stdout=stdout, stderr=_clip(msg.get("stderr"), limit),
                          error=_clip(error, max(limit, 20_000)) if isinstance(error, str) else None,
                          final=_clip(final, self.config.max_final_chars) if isinstance(final, str) else None,
                          truncated_chars=cut, wall_s=wall, restarted=restarted, subcall_wait_s=waited)

    # --- sub-calls -------------------------------------------------------------
    def _serve_subcall(self, op: str, items, t0: float, waited: float) -> tuple[dict, float]:
        """The answer to one request, and the seconds the sub-model took: all that is left off
        the cell's clock (checking the request is on it). Meanwhile the session is held
        (`SessionControl.hold`): frozen, or its CPU time polled against cpu_time_s."""
        try:
            prompts, pairs = self._checked_request(op, items)
        except Exception as exc:  # surfaces inside the cell as RuntimeError(message)
            return {"results": None, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}, 0.0
        if time.monotonic() - t0 - waited >= self.config.timeout_s:
            raise protocol.FrameTimeout("checking the request used up the cell's time")
        self._check_cpu()
        control = self._control
        started = time.monotonic()
        if control is not None:
            control.hold(self.config.cpu_time_s, self._pidfd, self.config.allow_background)
        reply: dict[str, Any]
        try:
            reply = {"results": self._call_handler(prompts, pairs), "error": None}
        except Exception as exc:
            reply = {"results": None, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        finally:
            over = control.release() if control is not None else None
        if over is not None:
            raise _OverCPU(over)
        return reply, time.monotonic() - started

    def _checked_request(self, op: str, items) -> tuple[list[str], list | None]:
        """The prompts (and rlm_query pairs) of a request, cheapest checks first: its size and
        whether there is a sub-model at all come before anything walks its items."""
        if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
            raise ValueError(f"a sub-call request needs 1 to {MAX_BATCH} prompts")
        if self.llm is None:
            raise RuntimeError("no sub-model configured: this REPL session has llm=None, "
                               "so llm_query/rlm_query cannot be used here")
        if op == "llm":
            if not all(isinstance(p, str) for p in items):
                raise ValueError("malformed sub-call request: prompts must be strings")
            prompts, pairs = items, None
        else:
            if not all(isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) for it in items):
                raise ValueError("malformed rlm_query request")
            # Contexts stay JSON text here: the child's worker decodes them, charged to its session.
            pairs = [(it[0], child_context.EncodedContext.from_wire(it[1])) for it in items]
            prompts = [p for p, _ in pairs]
        return prompts, pairs

    def _call_handler(self, prompts: list[str], pairs: list | None) -> list[str]:
        llm = self.llm
        if hasattr(llm, "llm_batch"):
            handler = cast(SubcallHandler, llm)
            results = handler.llm_batch(prompts) if pairs is None else handler.rlm_batch(pairs)
        else:  # a plain fn: rlm_query degrades to llm_query
            results = self._map_plain(cast(Callable[[str], str], llm), prompts)
        results = list(results)
        if len(results) != len(prompts):
            raise RuntimeError(f"sub-model handler returned {len(results)} answers for {len(prompts)} prompts")
        return [r if isinstance(r, str) else str(r) for r in results]

    def _map_plain(self, fn: Callable[[str], str], prompts: list[str]) -> list[str]:
        if len(prompts) == 1:
            return [fn(prompts[0])]
        workers = max(1, min(len(prompts), self.config.max_parallel_subcalls))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-subcall") as pool:
            return list(pool.map(fn, prompts))
