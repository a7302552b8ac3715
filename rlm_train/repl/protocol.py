"""Length-prefixed framed messages over Unix stream sockets.

Frame = 8-byte little-endian payload length + payload. File descriptors ride along
with the header via SCM_RIGHTS (`socket.send_fds`).

Two directions, two encodings:
- Trusted senders (host -> worker, fork-server/zygote <-> host): pickle, so a context
  of any picklable type reaches the worker as it was.
- The worker -> host: JSON (orjson), because the worker runs the cell's code and
  everything it writes to its socket is the attacker's. The JSON decoder builds only
  str/int/float/bool/None/list/dict, refuses nesting past 1,024 levels without
  recursing in C, and has no shared references, so the decoded size is bounded by the
  frame's; the frame is bounded (`max_bytes`) before a byte of it is allocated. A
  pickle decoder would construct objects, recurse in C on deep nesting (a SIGSEGV of
  the host) and let a small frame expand exponentially through shared references.

Host-side sends to a worker are bounded in time (`deadline`): a worker that stops
reading cannot block the host.

Cells that follow one another within `SPIN_S` (the code blocks of one model turn, a
bench's loop) are waited for by polling the socket instead of sleeping in the kernel:
a sleep and its wake-up cost ~30 us on each side here, as much as the cell itself.
Each side decides from its own last wait, so an RLM turn (seconds of model time between
cells) never spins, and nothing spins where the process has a single CPU to run on.
"""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import time

import orjson

HEADER = struct.Struct("<Q")
MAX_FDS = 8
SPIN_S = 0.0005  # longest a side polls for the next frame before it sleeps


class ProtocolError(Exception):
    """The peer closed the channel, timed out, or sent a malformed frame."""


class PeerClosed(ProtocolError):
    pass


class FrameTimeout(ProtocolError):
    pass


# --------------------------------------------------------------------------- encodings
def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=5)


def _scrub(obj):
    """Lone surrogates (a cell may print '\\udcff') are not UTF-8: replace them."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    return obj


def dumps_data(obj) -> bytes:
    """The worker's encoding: JSON data only. TypeError for anything else (bytes, sets,
    objects, non-str keys, nesting past orjson's limit)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        if "surrogates" in str(exc):
            return orjson.dumps(_scrub(obj))
        raise TypeError(f"cannot send this to the host: only plain data (str, int, float, bool, None, "
                        f"list, tuple, dict with str keys) crosses the sandbox ({exc})") from None


def loads_data(payload) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed frame: {str(exc)[:200]}") from None


# --------------------------------------------------------------------------- sending
def _send_until(sock: socket.socket, data: bytes, deadline: float) -> None:
    """sendall that gives up at `deadline` (FrameTimeout): the peer stopped reading."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [sock], [], left)[1]:
                raise FrameTimeout("the peer stopped reading") from None
            continue
        view = view[sent:]


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def _send_payload(sock: socket.socket, payload: bytes, fds=(), deadline: float | None = None) -> None:
    if fds:
        socket.send_fds(sock, [HEADER.pack(len(payload))], list(fds))
        data = payload
    else:
        data = _frame(payload)
    if deadline is not None:
        _send_until(sock, data, deadline)
    else:
        sock.sendall(data)


def send(sock: socket.socket, obj, fds=(), deadline: float | None = None) -> None:
    """A trusted sender's frame (pickle)."""
    _send_payload(sock, dumps(obj), fds, deadline)


def send_in_two_steps(sock: socket.socket, obj, deadline: float, between) -> None:
    """Send a trusted frame: what the socket takes at once, then `between()`, then the
    rest (bounded by `deadline`). The host queues a cell's frame before it thaws the
    worker, so the worker wakes once, to find the frame waiting, instead of twice."""
    data = _frame(dumps(obj))
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    between()
    if sent < len(data):
        _send_until(sock, data[sent:], deadline)


def send_raw(sock: socket.socket, payload: bytes, deadline: float | None = None) -> None:
    """Send an already encoded payload (pickle or JSON) as one frame."""
    _send_payload(sock, payload, deadline=deadline)


def send_data(sock: socket.socket, obj) -> None:
    """The worker's frame (JSON)."""
    _send_payload(sock, dumps_data(obj))


# --------------------------------------------------------------------------- receiving
def spinning_pays() -> bool:
    """Polling only helps when the peer can run on another CPU at the same time."""
    return len(os.sched_getaffinity(0)) > 1


def spin_until_readable(sock: socket.socket, seconds: float) -> bool:
    """Poll `sock` (a peek, no sleep) for up to `seconds`; True once a frame or EOF is there."""
    end = time.perf_counter() + seconds
    while True:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return True  # data, or b"" at EOF
        except BlockingIOError:
            pass
        except OSError:
            return True  # let the real read report it
        if time.perf_counter() >= end:
            return False


def _wait_readable(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([sock], [], [], left)[0]:
        raise FrameTimeout("timed out waiting for a frame")


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is None:
            k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        else:  # what already arrived is read without a select first (a frame is usually all there)
            try:
                k = sock.recv_into(view[got:], min(n - got, 1 << 24), socket.MSG_DONTWAIT)
            except BlockingIOError:
                _wait_readable(sock, deadline)
                continue
        if k == 0:
            raise PeerClosed("peer closed the channel mid-frame" if got else "peer closed the channel")
        got += k
    return buf


def _recv_payload(sock: socket.socket, max_bytes: int, deadline: float | None, want_fds: bool):
    fds: list[int] = []
    if want_fds:
        _wait_readable(sock, deadline)
        first, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
        if not first:
            raise PeerClosed("peer closed the channel")
        header = bytearray(first)
        if len(header) < HEADER.size:
            header += _recv_exact(sock, HEADER.size - len(header), deadline)
    else:
        header = _recv_exact(sock, HEADER.size, deadline)
    (length,) = HEADER.unpack(header)
    if length > max_bytes:  # checked before a byte of it is allocated
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    return _recv_exact(sock, length, deadline), fds


def recv(sock: socket.socket, *, max_bytes: int = 1 << 40, deadline: float | None = None, want_fds: bool = False):
    """Read one frame from a trusted sender (pickle). Returns obj, or (obj, fds) when want_fds."""
    payload, fds = _recv_payload(sock, max_bytes, deadline, want_fds)
    try:
        obj = pickle.loads(payload)
    except Exception as exc:
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    return (obj, fds) if want_fds else obj


def recv_data(sock: socket.socket, *, max_bytes: int, deadline: float | None = None) -> object:
    """Read one frame from the worker (JSON, at most max_bytes)."""
    payload, _ = _recv_payload(sock, max_bytes, deadline, False)
    return loads_data(payload)
