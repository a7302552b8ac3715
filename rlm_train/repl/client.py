"""Host side of the sandbox's process tree: the fork-server client and the zygote cache.

REPLSession (session.py) gets its workers from here. Thread safety: many sessions may
start at once from different threads; the fork-server and each zygote channel have
their own lock, held only for one request/reply (a few ms), never while a cell runs.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from rlm_train.repl import protocol
from rlm_train.repl.api import SandboxError

log = logging.getLogger(__name__)

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_UID_SLOTS = 256
MAX_IDLE_ZYGOTES = 4
# Contexts smaller than this skip the zygote: a pre-isolated pooled worker gets them over
# its socket (no zygote fork: less CPU per start). Above it, pickling per session costs more than the
# zygote (docs/measurements.md).
POOL_MAX_CONTEXT_BYTES = 256 << 10
START_TIMEOUT_S = 60.0

class SharedContext:
    """Wrap a list/dict context to share one zygote between sessions by identity.

    Plain str/bytes contexts are shared automatically (they are immutable). Other
    types get a private zygote per session unless wrapped, because the host could
    mutate them between sessions. A wrapped context is snapshotted at first use.
    """

    def __init__(self, value: Any):
        self.value = value


# --------------------------------------------------------------------------- fork-server client
class ForkServer:
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


_server: ForkServer | None = None
_server_lock = threading.Lock()
_disabled_layers: tuple[str, ...] = ()  # see session.disable_layers


def get_server() -> ForkServer:
    global _server
    with _server_lock:
        # A forked host (e.g. a DataLoader worker) must not share its parent's channel.
        if _server is None or _server.owner_pid != os.getpid() or _server.proc.poll() is not None:
            _server = ForkServer(_disabled_layers)
        return _server


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
class Zygote:
    def __init__(self, key, keepalive, server: ForkServer, value):
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
        except BaseException:
            self.broken = True  # the channel may be left mid-reply: no later spawn may read it
            raise
        finally:
            for uid in reply["unused"]:
                self.server.give_uid(uid)
        return reply, fds

    def close(self) -> None:
        self.ctl.close()  # EOF: the zygote stops its spare worker and exits
        # Wait, so that no spare worker or cgroup outlives close() / shutdown().
        exited = self.pidfd < 0 or bool(protocol.wait_ready([self.pidfd], 5.0))
        if self.pidfd >= 0:
            os.close(self.pidfd)
        if exited and self.spare_uid is not None:
            self.server.give_uid(self.spare_uid)
            self.spare_uid = None


_zygotes: "collections.OrderedDict[Any, Zygote]" = collections.OrderedDict()
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


def pool_payload(context) -> bytes | None:
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


def acquire_zygote(context, server: ForkServer) -> Zygote:
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
    z = Zygote(key, context, server, value)
    z.users = 1
    if key is not None:
        with _zygote_lock:
            old = _zygotes.pop(key, None)
            _zygotes[key] = z
        if old is not None and old.users == 0:
            old.close()
    return z


def release_zygote(z: Zygote) -> None:
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


