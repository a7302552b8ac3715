"""Host side of the sandbox: REPLSession, the fork-server client and the zygote cache.

Thread safety: many sessions may run `execute` at once from different threads
(the RLM loop uses asyncio.to_thread). Each session is used by one thread at a
time; the fork-server and each zygote channel have their own lock, held only
for one request/reply (a few ms), never while a cell runs.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import io
import logging
import os
import pickle
import reprlib
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from rlm_train.repl import cgroups, protocol
from rlm_train.repl.api import ExecResult, LLMArg, SandboxConfig, SandboxError

log = logging.getLogger(__name__)

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_UID_SLOTS = 256
MAX_IDLE_ZYGOTES = 4
# Contexts smaller than this skip the zygote: a pre-isolated pooled worker gets them over
# its socket (no zygote fork; ~35% less CPU per start). Above ~256 kB, pickling per session loses to the zygote.
POOL_MAX_CONTEXT_BYTES = 256 << 10
START_TIMEOUT_S = 60.0
READY_MAX_BYTES = 1 << 20
MAX_BATCH = 10_000  # prompts in one sub-call frame
MAX_CONTEXT_DEPTH = 100  # nesting of an rlm_query context
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
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel = 60, 60, 3


class SharedContext:
    """Wrap a list/dict context to share one zygote between sessions by identity.

    Plain str/bytes contexts are shared automatically (they are immutable). Other
    types get a private zygote per session unless wrapped, because the host could
    mutate them between sessions. A wrapped context is snapshotted at first use.
    """

    def __init__(self, value: Any):
        self.value = value


# --------------------------------------------------------------------------- fork-server client
class _ForkServer:
    """The channel to the fork-server. Requests are pipelined: a thread sends and goes on
    waiting for its own reply, so many threads starting sessions never queue behind one
    another's round trip. The fork-server answers in request order; a reader thread
    hands each reply to the oldest waiter."""

    def __init__(self, disabled_layers: tuple[str, ...] = ()):
        host_end, child_end = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_PKG_ROOT!r}); "
                "from rlm_train.repl.forkserver import main; main()")
        # A minimal environment: nothing of the host's (tokens, keys) reaches any worker.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(child_end.fileno()),
                                      ",".join(disabled_layers)],
                                     pass_fds=[child_end.fileno()], env=env, cwd="/",
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        child_end.close()
        self.sock = host_end
        self.owner_pid = os.getpid()
        hello = protocol.recv(self.sock, deadline=time.monotonic() + START_TIMEOUT_S)
        self.pid = hello["pid"]
        self.root = hello["euid"] == 0
        self.cgroup_paths: dict = hello["cgroups"]  # where the host freezes sessions and reads their CPU time
        # Per-session uids: disjoint across fork-servers (pids are unique), so RLIMIT_NPROC
        # and kill(-1) of one session never touch another's processes.
        self.uid_base = 100_000 + (self.pid % (1 << 22)) * _UID_SLOTS
        self.free_slots = collections.deque(range(_UID_SLOTS - 1, -1, -1))
        self.uid_lock = threading.Lock()
        self.send_lock = threading.Lock()  # held for one send, never across a wait
        self.waiters: collections.deque[concurrent.futures.Future] = collections.deque()
        self.reader = threading.Thread(target=self._read_replies, name="rlm-forkserver-reader", daemon=True)
        self.reader.start()

    def _read_replies(self) -> None:
        error: Exception = RuntimeError("the REPL fork-server exited")
        while True:
            try:
                reply = protocol.recv(self.sock, want_fds=True)
            except (OSError, protocol.ProtocolError) as exc:
                error = RuntimeError(f"lost the REPL fork-server: {exc}")
                break
            with self.send_lock:
                fut = self.waiters.popleft() if self.waiters else None
            if fut is None or not fut.set_running_or_notify_cancel():
                for fd in reply[1]:  # nobody waits for it any more (timed out)
                    os.close(fd)
                continue
            fut.set_result(reply)
        with self.send_lock:
            waiters, self.waiters = list(self.waiters), collections.deque()
        for fut in waiters:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)

    def request(self, msg: dict, fds=()) -> tuple[dict, list[int]]:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.send_lock:
            self.waiters.append(fut)  # before sending: the reply may come back at once
            try:
                protocol.send(self.sock, msg, fds=fds)
            except OSError as exc:
                self.waiters.remove(fut)
                raise RuntimeError(f"lost the REPL fork-server: {exc}") from None
        try:
            return fut.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RuntimeError(f"the REPL fork-server did not answer within {START_TIMEOUT_S:g}s") from None

    def new_zygote(self, req: dict, memfd: int | None) -> tuple[int, int, socket.socket]:
        """Returns the zygote's pid, a pidfd for it and our end of its control socket."""
        ours, theirs = socket.socketpair()
        try:
            reply, fds = self.request({"op": "zygote", **req},
                                      fds=[theirs.fileno()] + ([memfd] if memfd is not None else []))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return reply["pid"], (fds[0] if fds else -1), ours

    def claim(self, config: dict) -> tuple[dict, list[int]]:
        """A context-less worker from the fork-server's pool: reply (the worker's pid and
        uid) and fds (worker socket, status pipe, the worker's pidfd)."""
        uids = [self.take_uid()]
        try:
            uids.append(self.take_uid())  # for the pool's refill
        except RuntimeError:
            pass
        reply: dict = {"unused": uids}
        try:
            reply, fds = self.request({"op": "claim", "config": config, "uids": uids})
        finally:
            for uid in reply.get("unused", []):
                self.give_uid(uid)
        if reply.get("op") != "claimed":
            raise SandboxError(f"REPL fork-server failed to start a worker: {reply.get('error')}")
        return reply, fds

    def take_uid(self) -> int:
        with self.uid_lock:
            if not self.free_slots:
                raise SandboxError(f"more than {_UID_SLOTS} live REPL sessions in one process")
            # Last freed, first reused: that uid's cgroups exist already (sandbox.make_cgroups).
            return self.uid_base + self.free_slots.pop()

    def give_uid(self, uid: int) -> None:
        with self.uid_lock:
            self.free_slots.append(uid - self.uid_base)

    def shutdown(self) -> None:
        try:
            # EOF: the fork-server stops its pool and exits; zygotes and workers die with it.
            # shutdown() (not just close) also wakes our reader thread.
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


_server: _ForkServer | None = None
_server_lock = threading.Lock()
_disabled_layers: tuple[str, ...] = ()


def _get_server() -> _ForkServer:
    global _server
    with _server_lock:
        # A forked host (e.g. a DataLoader worker) must not share its parent's channel.
        if _server is None or _server.owner_pid != os.getpid() or _server.proc.poll() is not None:
            _server = _ForkServer(_disabled_layers)
        return _server


def disable_layers(layers: tuple[str, ...] = ()) -> None:
    """Benchmarks only: restart the fork-server without some layers ("cgroups",
    "minimal_root", "seccomp") to price each; () puts every layer back."""
    global _disabled_layers, _report
    shutdown()
    _disabled_layers = tuple(layers)
    _report = None


def shutdown() -> None:
    """Stop the fork-server and everything under it (also runs at exit)."""
    global _server
    with _zygote_lock:
        for z in list(_zygotes.values()):
            z.close()
        _zygotes.clear()
    with _server_lock:
        if _server is not None and _server.owner_pid == os.getpid():
            _server.shutdown()
        _server = None


atexit.register(shutdown)


# --------------------------------------------------------------------------- zygotes
class _Zygote:
    def __init__(self, key, keepalive, server: _ForkServer, value):
        self.key, self.keepalive, self.server = key, keepalive, server
        self.lock = threading.Lock()
        self.loaded = False
        self.users = 0
        self.broken = False
        self.pinned = None  # host object the zygote copies from until it says `loaded`
        # A shared zygote whose context is in use again keeps one spare worker ready for the
        # next session; it holds this uid. Not after the first claim: most contexts (one per
        # task) get one session, and a spare built then only competes with the next cold start.
        self.claims = 0
        self.spare_uid: int | None = None
        remote = _remote_request(value) if _remote_copy_ok else None
        if remote is not None:
            req, self.pinned = remote
            self.pid, self.pidfd, self.ctl = server.new_zygote(req, None)
            return
        kind, data = _payload(value)
        memfd = os.memfd_create("rlm-context", os.MFD_CLOEXEC)
        try:
            _write_all(memfd, data)
            self.pid, self.pidfd, self.ctl = server.new_zygote({"kind": kind, "size": len(data)}, memfd)
        finally:
            os.close(memfd)

    def spawn(self, config: dict) -> tuple[dict, list[int]]:
        """Claim a worker (the spare when its config matches). Returns the zygote's reply
        (the worker's pid and uid) and fds: worker socket, status pipe, the worker's pidfd."""
        uids = [self.server.take_uid()]
        self.claims += 1
        if self.key is not None and self.claims > 1:
            try:
                uids.append(self.server.take_uid())  # for the spare built after this claim
            except RuntimeError:
                pass
        reply: dict = {"unused": uids}
        try:
            with self.lock:
                # Sent before `loaded` arrives: the zygote forks the first worker as soon as
                # the context is in, without waiting for us to wake up.
                protocol.send(self.ctl, {"op": "spawn", "config": config, "uids": uids,
                                         "keep_spare": len(uids) > 1})
                if not self.loaded:
                    msg = protocol.recv(self.ctl, deadline=time.monotonic() + START_TIMEOUT_S)
                    self.pinned = None
                    if msg.get("op") == "load_failed":
                        _disable_remote_copy(msg.get("error"))
                        raise protocol.ProtocolError(f"context copy failed: {msg.get('error')}")
                    self.loaded = True
                reply, fds = protocol.recv(self.ctl, want_fds=True, deadline=time.monotonic() + START_TIMEOUT_S)
                self.spare_uid = reply["spare_uid"]
                if reply.get("op") != "spawned":
                    raise protocol.ProtocolError(f"fork failed: {reply.get('error')}")
        except (OSError, protocol.ProtocolError) as exc:
            self.broken = True
            raise SandboxError(f"REPL zygote {self.pid} failed: {exc}") from None
        finally:
            for uid in reply["unused"]:
                self.server.give_uid(uid)
        return reply, fds

    def close(self) -> None:
        self.ctl.close()  # EOF: the zygote stops its spare worker and exits
        # Wait, so that no spare worker or cgroup outlives close() / shutdown().
        exited = self.pidfd < 0 or bool(select.select([self.pidfd], [], [], 5.0)[0])
        if self.pidfd >= 0:
            os.close(self.pidfd)
        if exited and self.spare_uid is not None:
            self.server.give_uid(self.spare_uid)
            self.spare_uid = None


_zygotes: "collections.OrderedDict[Any, _Zygote]" = collections.OrderedDict()
_zygote_lock = threading.Lock()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_remote_copy_ok = True


def _disable_remote_copy(why) -> None:
    global _remote_copy_ok
    if _remote_copy_ok:
        _remote_copy_ok = False
        log.warning("REPL: cannot copy contexts with process_vm_readv (%s); using a memfd (slower cold start)", why)


def _remote_request(value) -> tuple[dict, Any] | None:
    """Describe where the context's bytes sit in this process, so the zygote can copy
    them in one step. Works for compact str (every str Python code makes) and,
    through pickle, for anything else; returns (request, object to keep alive)."""
    if isinstance(value, str) and type(value) is str:
        n = len(value)
        for kind_size, maxchar in ((1, 127), (1, 255), (2, 65535), (4, 0x10FFFF)):
            header = sys.getsizeof(value) - (n + 1) * kind_size
            if header == _ASCII_HEADER if maxchar == 127 else header == _COMPACT_HEADER:
                if maxchar == 127 and not value.isascii():
                    continue
                size = n * kind_size
                return ({"kind": "str_remote", "pid": os.getpid(), "addr": id(value) + header, "size": size,
                         "length": n, "maxchar": maxchar, "kind_size": kind_size}, value)
        return None
    data = pickle.dumps(value, protocol=5)
    addr = id(data) + sys.getsizeof(b"") - 1  # PyBytesObject data offset
    return {"kind": "pickle_remote", "pid": os.getpid(), "addr": addr, "size": len(data)}, data


_ASCII_HEADER = sys.getsizeof("") - 1
_COMPACT_HEADER = sys.getsizeof("\xff") - 2


def _payload(context) -> tuple[str, bytes]:
    if isinstance(context, str):
        return "str", context.encode("utf-8", "surrogatepass")
    return "pickle", pickle.dumps(context, protocol=5)


class _TooBig(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """Pickles plain data only, so a pooled worker can load it without importing anything.
    The C pickler calls reducer_override for everything except None/bool/int/float/str/
    bytes/bytearray/list/tuple/dict/set/frozenset (exact types)."""

    def reducer_override(self, obj):
        raise TypeError(f"{type(obj).__name__} is not plain data")


class _BoundedBuffer(io.BytesIO):
    def write(self, data) -> int:
        if self.tell() + len(data) > POOL_MAX_CONTEXT_BYTES:
            raise _TooBig
        return super().write(data)


def _pool_payload(context) -> bytes | None:
    """The context as the pooled worker's first frame, or None when it needs a zygote:
    explicitly shared, too big to send per session, or not plain data (a custom class
    would have to be imported inside the sandbox)."""
    if isinstance(context, SharedContext):
        return None
    if isinstance(context, (str, bytes)) and len(context) > POOL_MAX_CONTEXT_BYTES:
        return None  # skip pickling a big string only to throw it away
    buf = _BoundedBuffer()
    try:
        _PlainPickler(buf, protocol=5).dump(context)
    except (_TooBig, TypeError, pickle.PicklingError, RecursionError):
        return None
    return buf.getvalue()


def _acquire_zygote(context, server: _ForkServer) -> _Zygote:
    if isinstance(context, SharedContext):
        key, value = ("shared", id(context)), context.value
    elif isinstance(context, (str, bytes)):
        key, value = ("immutable", id(context)), context
    else:
        key, value = None, context  # private zygote, dropped with its session
    with _zygote_lock:
        z = _zygotes.get(key) if key is not None else None
        if z is not None and (z.broken or z.server is not server):
            _zygotes.pop(key)
            z = None
        if z is not None:
            _zygotes.move_to_end(key)
            z.users += 1
            return z
    # Ship outside the global lock: a big context must not stall other sessions.
    z = _Zygote(key, context, server, value)
    z.users = 1
    if key is not None:
        with _zygote_lock:
            old = _zygotes.pop(key, None)
            _zygotes[key] = z
        if old is not None and old.users == 0:
            old.close()
    return z


def _release_zygote(z: _Zygote) -> None:
    doomed = []
    with _zygote_lock:
        z.users -= 1
        if z.key is None or z.broken:
            if z.users == 0:
                if z.key is not None and _zygotes.get(z.key) is z:
                    _zygotes.pop(z.key)
                doomed.append(z)
        else:
            idle = [k for k, v in _zygotes.items() if v.users == 0]
            for k in idle[: max(0, len(idle) - MAX_IDLE_ZYGOTES)]:  # least recently used first
                doomed.append(_zygotes.pop(k))
    for old in doomed:  # outside the lock: close waits for the zygote to exit
        old.close()


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


def _note_report(report: dict) -> None:
    global _report
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


def _depth_within(value, limit: int) -> bool:
    """Nesting of decoded JSON data at most `limit` levels, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


class REPLSession:
    """A persistent sandboxed Python namespace (see DESIGN.md, "REPL sandbox").

    `timeout_s` bounds the wall time of each cell *excluding* the time the cell
    spends blocked on host sub-calls (llm_query & co.). When a cell breaks a
    limit, kills its worker or breaks the host protocol, the result says so with
    `restarted=True` and `error_kind`; the next `execute` runs in a fresh worker with
    an empty namespace. Nothing the worker sends is trusted: frames are size-capped
    before they are read, decoded as plain data, and every string is clipped here.
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
        self._pidfd = -1
        self._uid: int | None = None
        self._zygote: _Zygote | None = None
        self._server: _ForkServer | None = None
        self._control: cgroups.SessionControl | None = None
        self._closed = False
        self._start()

    # --- lifecycle -------------------------------------------------------------
    def _start(self) -> None:
        t0 = time.perf_counter()
        server = _get_server()
        self._server = server
        payload = _pool_payload(self.context)
        for attempt in range(2):
            try:
                self._spawn(server, payload)
                break
            except RuntimeError:
                self._kill()
                if attempt == 1:
                    raise
        self.start_s = time.perf_counter() - t0

    def _spawn(self, server: _ForkServer, payload: bytes | None) -> None:
        """Claim a worker (small context: from the fork-server's pool; else from the
        context's zygote) and wait for it outside every shared lock."""
        config = self.config.worker_settings()
        if payload is not None:
            reply, fds = server.claim(config)
            self.zygote_pid = server.pid  # the process this worker tree was forked from
        else:
            self._zygote = _acquire_zygote(self.context, server)
            reply, fds = self._zygote.spawn(config)
            self.zygote_pid = self._zygote.pid
        sock_fd, status_r, pidfd = fds
        self._uid = reply["uid"]
        self._sock, self._status_r, self._pidfd = socket.socket(fileno=sock_fd), status_r, pidfd
        self.pid = reply["pid"]
        deadline = time.monotonic() + START_TIMEOUT_S
        try:  # a pooled or spare worker said `ready` long ago: this frame is already waiting
            ready = protocol.recv_data(self._sock, max_bytes=READY_MAX_BYTES, deadline=deadline)
            if not isinstance(ready, dict) or not isinstance(ready.get("isolation"), dict):
                raise protocol.ProtocolError("the worker's first frame is not `ready`")
            if payload is not None:
                protocol.send_raw(self._sock, payload, deadline=deadline)
        except (protocol.ProtocolError, OSError) as exc:
            raise SandboxError(f"REPL worker failed to start: {exc}; {self._death_note()}") from None
        self.isolation = ready["isolation"]
        _note_report(self.isolation)
        if server.root and server.cgroup_paths:
            self._control = cgroups.SessionControl(server.cgroup_paths, server.pid, self._uid)
            self._freeze()

    def _freeze(self) -> None:
        """Between cells nothing of the session runs, unless background work is allowed."""
        if self._control is not None and not self.config.allow_background:
            self._control.freeze()

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
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        reaped = True
        if self._status_r >= 0:
            # The worker's parent writes the status (or closes the pipe) once it has reaped the
            # worker: after this nothing of the session is left.
            reaped = bool(select.select([self._status_r], [], [], 5.0)[0])
            os.close(self._status_r)
            self._status_r = -1
        if self._uid is not None and self._server is not None:
            if reaped:
                self._server.give_uid(self._uid)
            else:  # never hand a uid to a new session while a process may still run under it
                log.warning("REPL worker %s was not confirmed reaped within 5 s; retiring uid %s", self.pid, self._uid)
            self._uid = None
        if self._zygote is not None:
            _release_zygote(self._zygote)
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
        if self._closed:
            raise RuntimeError("REPLSession is closed")
        restarted_before = False
        if self._sock is None:  # the previous cell killed the worker: fresh namespace
            self._start()
            restarted_before = True
        t0 = time.monotonic()
        waited = 0.0
        timeout = self.config.timeout_s
        try:
            if self._control is not None:
                self._control.thaw()
            protocol.send(self._sock, {"op": "exec", "code": code}, deadline=t0 + timeout)
            while True:
                left = timeout - (time.monotonic() - t0 - waited)
                msg = self._next_frame(left)
                op = msg.get("op")
                if op == "done":
                    return self._finish_cell(msg, t0, waited, restarted_before)
                if op in ("llm", "rlm"):
                    t_sub = time.monotonic()
                    reply = self._serve_subcall(op, msg.get("items"))
                    waited += time.monotonic() - t_sub
                    left = timeout - (time.monotonic() - t0 - waited)
                    protocol.send(self._sock, reply, deadline=time.monotonic() + max(left, 0.05))
                    continue
                raise protocol.ProtocolError(f"unexpected frame op {_short.repr(op)}")
        except protocol.FrameTimeout:
            return self._fail(f"TimeoutError: the cell ran longer than timeout_s={timeout:g}s "
                              f"(time waiting on sub-calls excluded); the worker was killed",
                              t0, waited, "timeout", timed_out=True)
        except protocol.PeerClosed:
            return self._fail(f"WorkerDied: the REPL worker {self._death_note()}", t0, waited, "sandbox")
        except (protocol.ProtocolError, OSError) as exc:
            return self._fail(f"ProtocolError: the worker broke the host protocol ({str(exc)[:300]}); it was killed",
                              t0, waited, "sandbox")

    def _next_frame(self, left: float) -> dict:
        if left <= 0:
            raise protocol.FrameTimeout("cell timeout")
        ready, _, _ = select.select([self._sock, self._status_r], [], [], left)
        if not ready:
            raise protocol.FrameTimeout("cell timeout")
        if self._sock not in ready:
            raise protocol.PeerClosed("worker exited")  # its parent reported its death
        msg = protocol.recv_data(self._sock, max_bytes=self.config.max_message_mb << 20,
                                 deadline=time.monotonic() + max(left, 0.05))
        if not isinstance(msg, dict):
            raise protocol.ProtocolError(f"frame is a {type(msg).__name__}, not an object")
        return msg

    def _finish_cell(self, msg: dict, t0: float, waited: float, restarted: bool) -> ExecResult:
        if self._control is not None:
            used = self._control.cpu_used()
            if used > self.config.cpu_time_s:
                return self._fail(f"CPUTimeExceeded: the session used {used:.1f} CPU seconds, over "
                                  f"cpu_time_s={self.config.cpu_time_s:g}; the worker was killed", t0, waited, "limit")
        self._freeze()
        return self._result(msg, time.monotonic() - t0, waited, restarted)

    def _death_note(self) -> str:
        """How the worker died, from the status pipe its parent writes."""
        if self._status_r < 0 or not select.select([self._status_r], [], [], 5.0)[0]:
            return "stopped answering"
        data = os.read(self._status_r, 4)
        if len(data) != 4:
            return "died (its parent process is gone)"
        (status,) = struct.unpack("<i", data)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            hint = {signal.SIGKILL: " (a limit or a kill)", signal.SIGXCPU: " (CPU time limit)",
                    signal.SIGSEGV: " (crash)"}.get(sig, "")
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
        cut = cut if isinstance(cut, int) and 0 <= cut < 1 << 62 else 0
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
    def _serve_subcall(self, op: str, items) -> dict:
        try:
            return {"results": self._call_handler(op, items), "error": None}
        except Exception as exc:  # surfaces inside the cell as RuntimeError(message)
            return {"results": None, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}

    def _call_handler(self, op: str, items) -> list[str]:
        if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
            raise ValueError(f"a sub-call request needs 1 to {MAX_BATCH} prompts")
        if op == "llm":
            if not all(isinstance(p, str) for p in items):
                raise ValueError("malformed sub-call request: prompts must be strings")
            prompts, pairs = items, None
        else:
            if not all(isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) for it in items):
                raise ValueError("malformed rlm_query request")
            if not all(_depth_within(it[1], MAX_CONTEXT_DEPTH) for it in items):
                raise ValueError(f"an rlm_query context may nest at most {MAX_CONTEXT_DEPTH} levels deep")
            pairs = [(it[0], it[1]) for it in items]
            prompts = [p for p, _ in pairs]
        if self.llm is None:
            raise RuntimeError("no sub-model configured: this REPL session has llm=None, "
                               "so llm_query/rlm_query cannot be used here")
        if hasattr(self.llm, "llm_batch"):
            results = self.llm.llm_batch(prompts) if pairs is None else self.llm.rlm_batch(pairs)
        else:
            results = self._map_plain(prompts)  # a plain fn: rlm_query degrades to llm_query
        results = list(results)
        if len(results) != len(prompts):
            raise RuntimeError(f"sub-model handler returned {len(results)} answers for {len(prompts)} prompts")
        return [r if isinstance(r, str) else str(r) for r in results]

    def _map_plain(self, prompts: list[str]) -> list[str]:
        if len(prompts) == 1:
            return [self.llm(prompts[0])]
        workers = max(1, min(len(prompts), self.config.max_parallel_subcalls))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-subcall") as pool:
            return list(pool.map(self.llm, prompts))
