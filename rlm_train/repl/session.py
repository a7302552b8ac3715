"""Host side of the sandbox: REPLSession and the isolation report.

A cell runs from a coroutine on the event loop (`execute_async`: the RLM loop, no thread
per cell) or blocking its thread (`execute`); both are the same coroutine, `_cell`, whose
waits block when it has no loop. Many sessions may run cells at once, on one loop or from
different threads; each session runs one cell at a time. Workers come from the
fork-server and zygotes (client.py).
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Coroutine, TypeVar

from rlm_train.repl import cgroup_host, channel, child_context, protocol, subcalls
from rlm_train.repl.api import ExecResult, LLMArg, SandboxConfig, SandboxError
from rlm_train.repl.isolation import (  # noqa: F401 (the isolation report's names, where callers import them)
    EXPECTED_LAYERS, LAYERS, disable_layers, isolation_report, note_report, weakness_line)
from rlm_train.repl.client import START_TIMEOUT_S, ForkServer, Zygote, acquire_zygote, get_server, pool_payload, release_zygote

log = logging.getLogger(__name__)
T = TypeVar("T")

READY_MAX_BYTES = 1 << 20
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


# --------------------------------------------------------------------------- session
def _blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of this module given no loop (loop=None): its every wait blocks, so
    it ends in its first step."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a blocking cell waited on an event loop")  # a wait forgot `loop is None`


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
        self._sock: socket.socket | None = None
        self._status_r = -1
        self._poll: select.poll | None = None  # the worker's channel and status pipe, registered once
        self._pidfd = -1
        self._uid: int | None = None
        self._zygote: Zygote | None = None
        self._server: ForkServer | None = None
        self._control: cgroup_host.SessionControl | None = None
        self._closed = False
        self._stopped = False  # a cancelled cell's worker was sent SIGKILL, not yet reaped
        # Poll for the `done` frame (protocol.SPIN_S) while this session's cells come back that fast.
        self._may_spin = protocol.spinning_pays()
        self._spin = False
        self._start()

    # --- lifecycle -------------------------------------------------------------
    def _start(self) -> None:
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
            raise SandboxError(f"REPL worker failed to start: {exc}; {_blocking(self._death_note(None))}") from None
        if not isinstance(loaded, dict) or loaded.get("op") != "loaded":
            why = loaded.get("error") if isinstance(loaded, dict) else None
            raise SandboxError(_clip(why, 500) if isinstance(why, str) else "the worker's answer to its context is not `loaded`")
        self.isolation = ready["isolation"]
        note_report(self.isolation)
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
        """Run a cell, blocking this thread: for callers without an event loop. The cell is
        the same coroutine as execute_async's; here its every wait blocks, so it runs to the
        end in one step and no loop is involved."""
        return _blocking(self._counted(code, None))

    async def execute_async(self, code: str) -> ExecResult:
        """Run a cell on the running event loop: its frames are read as they arrive and its
        sub-calls answered on the loop (an async `llm_batch`/`rlm_batch` is awaited there).
        Cancelled, the cell's worker is killed (the next cell starts a fresh one)."""
        return await self._counted(code, asyncio.get_running_loop())

    async def _counted(self, code: str, loop: asyncio.AbstractEventLoop | None) -> ExecResult:
        global _running_cells
        if self._closed:
            raise RuntimeError("REPLSession is closed")
        with _running_lock:
            _running_cells += 1
        try:
            return await self._cell(code, loop)
        except BaseException:  # cancelled or interrupted mid-cell: the worker's state is unknown
            if loop is None:
                self._kill()
            else:  # SIGKILL now; waiting for its reaping is left off the loop (close(), or the next cell)
                self._stop_worker()
            raise
        finally:
            with _running_lock:
                _running_cells -= 1

    def _stop_worker(self) -> None:
        """SIGKILL the worker (thawed, so that it dies); `_kill` finishes the job later."""
        self._stopped = True
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._control is not None:
            self._control.thaw()

    async def _cell(self, code: str, loop: asyncio.AbstractEventLoop | None) -> ExecResult:
        restarted_before = False
        if self._stopped:  # a cancelled cell's worker: gone by now, its reaping confirmed here
            self._stopped = False
            self._kill()
        if self._sock is None:  # the previous cell killed the worker: fresh namespace
            self._start()
            restarted_before = True
        sock = self._sock
        assert sock is not None  # _start() connects or raises
        t0 = time.monotonic()
        waited = 0.0
        timeout = self.config.timeout_s
        try:
            await self._send_to_worker(loop, sock, {"op": "exec", "code": code}, t0 + timeout)
            while True:
                left = timeout - (time.monotonic() - t0 - waited)
                msg = await self._next_frame(loop, sock, left)
                op = msg.get("op")
                if op == "done":
                    self._spin = self._may_spin and time.monotonic() - t0 < protocol.SPIN_S
                    return self._finish_cell(msg, t0, waited, restarted_before)
                if op in ("llm", "rlm"):
                    reply, answering = await self._serve_subcall(loop, op, msg.get("items"), t0, waited)
                    waited += answering
                    left = timeout - (time.monotonic() - t0 - waited)
                    await self._send_to_worker(loop, sock, reply, time.monotonic() + max(left, 0.05))
                    continue
                raise protocol.ProtocolError(f"unexpected frame op {_short.repr(op)}")
        except protocol.FrameTimeout:
            return await self._fail(loop, f"TimeoutError: the cell ran longer than timeout_s={timeout:g}s "
                                    f"(time the sub-model took to answer excluded); the worker was killed",
                                    t0, waited, "timeout", timed_out=True)
        except _OverCPU as over:
            return await self._fail(loop, f"CPUTimeExceeded: the session used {over.args[0]:.1f} CPU seconds, over "
                                    f"cpu_time_s={self.config.cpu_time_s:g}; the worker was killed", t0, waited, "limit")
        except protocol.PeerClosed:
            note = await self._death_note(loop)
            return await self._fail(loop, f"WorkerDied: the REPL worker {note}", t0, waited, "sandbox")
        except (protocol.ProtocolError, OSError) as exc:
            return await self._fail(loop, f"ProtocolError: the worker broke the host protocol ({str(exc)[:300]}); "
                                    f"it was killed", t0, waited, "sandbox")

    async def _send_to_worker(self, loop: asyncio.AbstractEventLoop | None, sock: socket.socket, frame: dict,
                              deadline: float) -> None:
        """A cell or a sub-call's answer. A frozen session gets the frame queued before the
        thaw, so the worker wakes once, to find it waiting."""
        if loop is not None:
            control = self._control

            async def thaw() -> None:
                # A write to the freeze file can wait on the kernel (or on the freezer thread's
                # write): off the loop. Only a frozen session needs one, and it cannot send a
                # frame (nor so be frozen or held again) before it is done.
                if control is not None and not control.thaw_at_once():
                    await asyncio.to_thread(control.thaw)

            await channel.send(loop, sock, frame, deadline, thaw)
        elif self._control is not None:
            protocol.send_in_two_steps(sock, frame, deadline, between=self._control.thaw)
        else:
            protocol.send(sock, frame, deadline=deadline)

    def _check_cpu(self) -> None:
        """_OverCPU when the session has used more than cpu_time_s (read only when it can have)."""
        used = self._control.over_budget(self.config.cpu_time_s) if self._control is not None else None
        if used is not None:
            raise _OverCPU(used)

    async def _next_frame(self, loop: asyncio.AbstractEventLoop | None, sock: socket.socket, left: float) -> dict:
        if left <= 0 or self._poll is None:
            raise protocol.FrameTimeout("cell timeout")
        if loop is not None:
            # In its own pid namespace the worker's death ends every process that could hold
            # its end of the channel, so the channel's end says it: no need to watch the
            # status pipe as well (two more loop registrations per frame).
            status = -1 if self.isolation.get("pid_namespace") else self._status_r
            msg = await channel.recv_data(loop, sock, status, max_bytes=self.config.max_message_mb << 20,
                                          deadline=time.monotonic() + left)
            if not isinstance(msg, dict):
                raise protocol.ProtocolError(f"frame is a {type(msg).__name__}, not an object")
            return msg
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

    async def _death_note(self, loop: asyncio.AbstractEventLoop | None) -> str:
        """How the worker died, from the status pipe its parent writes. A worker that only
        closed its end of the channel is still running: after a short grace it is killed
        here, so the cell returns at once instead of waiting for an exit that never comes."""
        if self._status_r < 0:
            return "stopped answering"
        if not await self._status_within(loop, 0.2):
            if self._pidfd >= 0:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not await self._status_within(loop, 5.0):
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

    async def _status_within(self, loop: asyncio.AbstractEventLoop | None, timeout: float) -> bool:
        """Whether the worker's parent reports its death within `timeout` seconds."""
        if loop is None:
            return bool(protocol.wait_ready([self._status_r], timeout))
        return await channel.wait_fd(loop, self._status_r, timeout)

    async def _fail(self, loop: asyncio.AbstractEventLoop | None, why: str, t0: float, waited: float, kind: str,
                    timed_out: bool = False) -> ExecResult:
        if loop is not None and self._status_r >= 0:
            self._stop_worker()  # its death awaited on the loop: _kill then finds it reaped
            await self._status_within(loop, 5.0)
        self._stopped = False
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
    async def _serve_subcall(self, loop: asyncio.AbstractEventLoop | None, op: str, items, t0: float,
                             waited: float) -> tuple[dict, float]:
        """The answer to one request, and the seconds the sub-model took: all that is left off
        the cell's clock (checking the request is on it). Meanwhile the session is held
        (`SessionControl.hold`): frozen, or its CPU time polled against cpu_time_s."""
        try:
            prompts, pairs = subcalls.checked_request(op, items, self.llm)
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
            answers = await subcalls.answer(loop, self.llm, prompts, pairs, self.config.max_parallel_subcalls)
            reply = {"results": answers, "error": None}
        except Exception as exc:
            reply = {"results": None, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        finally:
            over = control.release() if control is not None else None
        if over is not None:
            raise _OverCPU(over)
        return reply, time.monotonic() - started
