"""Length-prefixed framed messages over Unix stream sockets.

Frame = 8-byte little-endian payload length + payload. File descriptors ride along
with the header via SCM_RIGHTS (`socket.send_fds`).

Two directions, two encodings:
- Trusted senders (host -> worker, fork-server/zygote <-> host): pickle, so a context
  of any picklable type reaches the worker as it was.
- The worker -> host: JSON (orjson), because the worker runs the cell's code and
  everything it writes to its socket is the attacker's. The JSON decoder builds only
  str/int/float/bool/None/list/dict, refuses nesting past 1,024 levels without
  recursing in C, and has no shared references, so the decoded size grows with the
  frame's only linearly; the frame is bounded (`max_bytes`) before a byte of it is
  allocated. A pickle decoder would construct objects, recurse in C on deep nesting (a
  SIGSEGV of the host) and let a small frame expand exponentially through shared
  references. Linearly is still ~25x for `[[],[],...]`, decoded with the GIL held, so
  the host also counts a frame's values from its bytes before decoding it
  (`values_within`, at most MAX_VALUES), and the worker refuses to send more
  (`dumps_frame`): the host's cost is bounded by what it accepts.

Host-side sends to a worker are bounded in time (`deadline`): a worker that stops
reading cannot block the host. Every wait on a descriptor goes through `wait_ready` (poll):
select() refuses descriptors numbered 1024 and up, which a host holding many connections
(the gateway) reaches, and then no session could start.

Cells that follow one another within `SPIN_S` (the code blocks of one model turn, a
bench's loop) are waited for by polling the socket instead of sleeping in the kernel:
a sleep and its wake-up cost as much as a short cell itself (docs/measurements.md).
Each side decides from its own last wait, so an RLM turn (seconds of model time between
cells) never spins, and nothing spins where the process has a single CPU to run on.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import pickle
import re
import select
import socket
import struct
import time

import orjson

HEADER = struct.Struct("<Q")
MAX_FDS = 8
SPIN_S = 0.0005  # longest a side polls for the next frame before it sleeps
# Values (strings, numbers, lists, dicts, dict keys) one worker frame may decode to. A full
# sub-call request (10,000 rlm_query pairs, subcalls.MAX_BATCH) holds about 60,000.
MAX_VALUES = 100_000


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
        first = exc
    try:
        return orjson.dumps(_scrub(obj))  # lone surrogates in a str: the one failure scrubbing fixes
    except (orjson.JSONEncodeError, RecursionError):
        raise TypeError(f"cannot send this to the host: only plain data (str, int, float, bool, None, "
                        f"list, tuple, dict with str keys) crosses the sandbox ({first})") from None


def dumps_frame(obj) -> bytes:
    """A worker's frame: dumps_data, and ValueError for more values than the host accepts,
    so that the cell gets the error instead of the session ending."""
    payload = dumps_data(obj)
    if not values_within(payload):
        raise ValueError(f"cannot send this to the host: it holds more than {MAX_VALUES:,} values (strings, "
                         f"numbers, lists, dicts and their keys together), the most the host takes in one "
                         f"request; send fewer, bigger pieces")
    return payload


def loads_data(payload) -> object:
    if not values_within(payload):
        raise ProtocolError(f"frame of {len(payload):,} bytes holds more than {MAX_VALUES:,} values")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed frame: {str(exc)[:200]}") from None


# One match per value past the first: the bytes up to and including the next ',' ':' '[' or
# '{' outside strings, whole strings skipped on the way; or the rest of the bytes looked at
# when none is left there, which may end inside a string that goes on past them (group 1).
# Matches are never empty, so those of one call lie end to end from a point outside strings
# to the end of the bytes looked at, and none starts inside a string.
_TOKEN = re.compile(rb'(?=.)(?:[^",:\[{]++|"(?:[^"\\]++|\\.)*+")*+(?:[,:\[{]|("(?:[^"\\]++|\\.)*+\\?)?\Z)', re.DOTALL)
_IN_STRING = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)  # a string's bytes, up to its closing quote
_SCAN_BYTES = 1 << 16  # what one regex call looks at: the GIL is let go between calls
_COUNT_BYTES = 1 << 20  # the same for bytes.count
_STRUCTURE = frozenset(b",:[{")


def _structure_below(payload, n: int, limit: int) -> bool:
    total = 0
    for start in range(0, n, _COUNT_BYTES):
        end = min(n, start + _COUNT_BYTES)
        total += (payload.count(b",", start, end) + payload.count(b":", start, end)
                  + payload.count(b"[", start, end) + payload.count(b"{", start, end))
    return total < limit


def _string_end(payload, pos: int, n: int) -> int:
    """Where the string whose bytes start at `pos` closes (its quote), or -1 when it does not."""
    while True:
        run = _IN_STRING.match(payload, pos, min(n, pos + _COUNT_BYTES))
        stop = run.end() if run else pos  # it always matches, if only the empty run
        if stop < n and payload[stop] == 0x22:  # escapes were read in pairs: this quote closes it
            return stop
        if stop == pos or stop >= n:
            return -1
        pos = stop


def values_within(payload, limit: int = MAX_VALUES) -> bool:
    """Whether JSON `payload` decodes to at most `limit` values, judged from its bytes before
    anything is decoded. Every value but the outermost follows a ',' ':' '[' or '{' outside
    strings, so their number + 1 bounds the values (and the objects decoding makes). A frame
    shorter than `limit` passes at once; else its bytes are counted, and only when text inside
    strings takes that count to `limit` are they counted again outside strings only (`_TOKEN`,
    at most `limit` matches). Malformed JSON is left for the decoder to refuse."""
    n = len(payload)
    if n < limit or _structure_below(payload, n, limit):
        return True
    pos = found = 0
    while pos < n:
        end = min(n, pos + _SCAN_BYTES)
        # Counted in C: the matches go through zip and a deque, never through Python code.
        match, count = collections.deque(zip(_TOKEN.finditer(payload, pos, end), itertools.count(1)), maxlen=1)[0]
        cut = match.start(1)
        if cut >= 0 or payload[end - 1] not in _STRUCTURE:
            count -= 1  # the last match ended with the bytes looked at, not at a value
        found += count
        if found >= limit:
            return False
        pos = end
        if cut >= 0:  # a string goes on past `end`: find its end in bounded steps
            close = _string_end(payload, cut + 1, n)
            if close < 0:
                return True  # unterminated: the decoder refuses it
            pos = close + 1
    return True


# --------------------------------------------------------------------------- waiting
def wait_ready(fds: list, timeout: float | None, events: int = select.POLLIN) -> list[int]:
    """The descriptors of `fds` (ints or objects with fileno()) that are ready for `events`
    within `timeout` seconds (None: no limit; 0: do not wait), as fd numbers. A hang-up or
    an error counts as ready, as with select(), so the caller's next read reports it."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    ms = -1 if timeout is None else min(math.ceil(max(timeout, 0.0) * 1000), 2**31 - 1)
    return [fd for fd, _ in poller.poll(ms)]


# --------------------------------------------------------------------------- sending
def _send_until(sock: socket.socket, data: bytes, deadline: float) -> None:
    """sendall that gives up at `deadline` (FrameTimeout): the peer stopped reading."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_ready([sock], left, select.POLLOUT):
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
    _send_payload(sock, dumps_frame(obj))


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
    if left <= 0 or not wait_ready([sock], left):
        raise FrameTimeout("timed out waiting for a frame")


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is None:
            k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        else:  # what already arrived is read without waiting first (a frame is usually all there)
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
