"""Length-prefixed framed messages over Unix stream sockets.

Frame = 8-byte little-endian payload length + pickle payload. File descriptors
ride along with the header via SCM_RIGHTS (`socket.send_fds`).

Trust: the host only unpickles worker frames with `SafeUnpickler`, which refuses
every global (no classes, no functions), so a hostile cell cannot run code in
the host by writing a crafted pickle to its socket. Plain data (str, bytes,
int, float, list, tuple, dict, set, None, bool) still round-trips, which is
all the worker ever needs to send.
"""

from __future__ import annotations

import io
import pickle
import select
import socket
import struct
import time

HEADER = struct.Struct("<Q")
MAX_FDS = 8


class ProtocolError(Exception):
    """The peer closed the channel, timed out, or sent a malformed frame."""


class PeerClosed(ProtocolError):
    pass


class FrameTimeout(ProtocolError):
    pass


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # noqa: D401 - pickle hook
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed from the worker")


class PlainPickler(pickle.Pickler):
    """Pickles plain data only. The C pickler calls reducer_override for everything
    except None/bool/int/float/str/bytes/bytearray/list/tuple/dict/set/frozenset
    (exact types), so refusing there keeps worker frames loadable by SafeUnpickler."""

    def reducer_override(self, obj):
        raise TypeError(f"cannot send {type(obj).__name__} to the host: only plain data "
                        "(str, bytes, int, float, bool, None, list, tuple, dict, set) crosses the sandbox")


def dumps(obj, plain: bool = False) -> bytes:
    if not plain:
        return pickle.dumps(obj, protocol=5)
    buf = io.BytesIO()
    PlainPickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def safe_loads(data) -> object:
    return SafeUnpickler(io.BytesIO(data)).load()


def send(sock: socket.socket, obj, fds=(), plain: bool = False) -> None:
    payload = dumps(obj, plain)
    header = HEADER.pack(len(payload))
    if fds:
        socket.send_fds(sock, [header], list(fds))
        sock.sendall(payload)
    elif len(payload) < 65536:
        sock.sendall(header + payload)
    else:  # big payloads: skip the concatenation copy
        sock.sendall(header)
        sock.sendall(payload)


def send_raw(sock: socket.socket, payload: bytes) -> None:
    """Send an already pickled payload as one frame."""
    sock.sendall(HEADER.pack(len(payload)))
    sock.sendall(payload)


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


def recv(sock: socket.socket, *, trusted: bool = True, max_bytes: int = 1 << 34,
         deadline: float | None = None, want_fds: bool = False):
    """Read one frame. Returns obj, or (obj, fds) when want_fds."""
    fds: list[int] = []
    if want_fds:
        _wait_readable(sock, deadline)
        header, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
        if not header:
            raise PeerClosed("peer closed the channel")
        header = bytearray(header)
        if len(header) < HEADER.size:
            header += _recv_exact(sock, HEADER.size - len(header), deadline)
    else:
        header = _recv_exact(sock, HEADER.size, deadline)
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    payload = _recv_exact(sock, length, deadline)
    try:
        obj = pickle.loads(payload) if trusted else safe_loads(payload)
    except Exception as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None
    return (obj, fds) if want_fds else obj
