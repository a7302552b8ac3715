"""HTTP/1.1 over asyncio protocols: the transport of the OpenAI client, and the parser and
writer the test mock server (`rlm_train.testing.mock_server`) answers with.

Client side: an `Endpoint` is one origin (scheme, host, port) with its idle keep-alive
connections; it sends one request per connection at a time and reads responses framed by
Content-Length, chunked transfer coding or the end of the connection. TLS for https://
URLs; no HTTP proxies: inference servers are reached directly. Server side:
`parse_request` and `format_response`. Both sides read heads with `parse_head`.

Why a protocol of our own: one RLM root turn fans out into dozens of concurrent sub-calls,
a generation run into hundreds, on 2-core machines, and every answer is streamed.
`rlm-train bench http` is the record of the choice: it times this transport against the
same client on the standard library's asyncio streams and against aiohttp, each on
asyncio's loop and on uvloop, and keeps the simplest one within 10% of the fastest. Streams
pay a task wake-up for every streamed arrival, which these callbacks do not; aiohttp costs
several times the CPU per request (docs/scaling.md has the table).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

KEEPALIVE_S = 4.0  # reuse idle connections only this long: uvicorn (vLLM) closes them after 5 s
MAX_HEAD = 1 << 20  # a status line plus headers longer than this is not an inference server
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _NoResponse(Exception):
    """The connection closed before a single byte of the response arrived."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was already closed by the server before it answered."""


_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
    return _SSL


class Endpoint:
    """One origin, e.g. http://127.0.0.1:8000, and its idle keep-alive connections.

    Connections belong to the event loop that opened them: after a loop change call
    `forget()` (their transports died with the old loop)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"URL {url!r} must look like http://HOST:PORT/PATH")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]  # keeps [::1] brackets, drops user:pass
        self.path = parts.path.rstrip("/")  # the URL's path, e.g. /v1; requests name their own target
        self.idle: list[_ClientConnection] = []

    async def request(self, method: str, target: str, body: bytes = b"", headers: str = "",
                      on_data: Callable[[bytes], None] | None = None) -> Response:
        """One request and its response. `headers`: extra header lines, each ending in CRLF
        (Host and Content-Length are added here). `on_data(bytes)` sees the response's bytes
        as they arrive (a streamed answer's tokens show the server is alive). Raises OSError
        for a refused or reset connection, EOFError or ValueError for a cut or garbled
        response."""
        data = (f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, reused=True, on_data=on_data)
            except _StaleConnection:
                pass  # the server had closed this idle connection; the request never ran
        return await self._exchange(await self._connect(), data, reused=False, on_data=on_data)

    def close(self) -> None:
        """Close every idle connection (ones in use close when their request ends)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.abort()

    def forget(self) -> None:
        self.idle.clear()

    def _take_idle(self) -> _ClientConnection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # most recent first: least likely to be stale
            if now - conn.last_used < KEEPALIVE_S and conn.reusable():
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_ClientConnection, self.host, self.port,
                                               ssl=_ssl_context() if self.tls else None)
        return conn

    async def _exchange(self, conn: _ClientConnection, data: bytes, reused: bool,
                        on_data: Callable[[bytes], None] | None = None) -> Response:
        keep = False
        try:
            resp, keep = await conn.request(data, on_data)
            return resp
        except _NoResponse:
            if reused:  # the server closed this idle connection before it saw our request
                raise _StaleConnection() from None
            raise EOFError("server closed the connection without answering") from None
        finally:
            if keep:
                conn.last_used = time.monotonic()
                self.idle.append(conn)
            else:
                conn.abort()


class _ClientConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time. A protocol rather than
    asyncio streams: the response, however it is framed, is parsed straight from the
    bytes the loop hands us, with no reader/writer objects and no task wake-up per
    streamed token (`rlm-train bench http` times both)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.last_used = time.monotonic()
        self.on_data: Callable[[bytes], None] | None = None
        self.head_end = -1  # where the current response's head ends, once seen
        self.chunked = False  # whether that response is chunked (then complete only at its 0-size chunk)

    # -- protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.on_data is not None:
            self.on_data(data)
        if self._maybe_complete():
            self._try_finish()

    def eof_received(self) -> bool:
        self.closed = True
        self._try_finish()
        return False  # close the transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._try_finish()

    # -- the request
    def reusable(self) -> bool:
        # Bytes nobody asked for, or a half-closed socket, mean the server is done with us.
        return not self.closed and not self.buffer and self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        """Close now, with a reset rather than a FIN: the closing side of a FIN keeps the
        socket in TIME_WAIT for 60 s, and thousands of those (one generate run opens
        hundreds of connections) slowed every later loopback request on the machine."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    async def request(self, data: bytes, on_data: Callable[[bytes], None] | None = None) -> tuple[Response, bool]:
        if self.transport is None:
            raise EOFError("the connection is not open")
        self.buffer.clear()
        self.head_end, self.chunked, self.on_data = -1, False, on_data
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        self._try_finish()  # the connection may have closed already
        try:
            return await self.waiter
        finally:
            self.waiter = None
            self.on_data = None

    def _maybe_complete(self) -> bool:
        """Whether the buffer may hold a whole response. A streamed answer arrives as
        hundreds of small chunks: parsing the growing buffer on each would cost quadratic
        time, so a chunked body is parsed only once it ends like its last chunk."""
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end < 0:
                return len(self.buffer) > MAX_HEAD  # let the parser refuse it
            head = bytes(self.buffer[:self.head_end]).lower()
            self.chunked = b"transfer-encoding" in head and b"chunked" in head and not head.startswith(b"http/1.1 1")
        return not self.chunked or self.buffer.endswith(b"0\r\n\r\n")

    def _try_finish(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = parse_response(self.buffer, self.closed)
        except ValueError as exc:  # garbled response: the caller retries elsewhere
            waiter.set_exception(exc)
            return
        if parsed is not None:
            response, keep, used = parsed
            del self.buffer[:used]
            waiter.set_result((response, keep))
        elif self.closed:
            waiter.set_exception(_NoResponse() if not self.buffer else
                                 EOFError("server closed the connection mid-response"))


# ---- parsing and writing messages ----

def parse_head(head: bytes | bytearray) -> tuple[str, dict[str, str]]:
    """An HTTP/1.1 head (without its blank line): the first line, and the headers by
    lower-case name."""
    first, *lines = bytes(head).decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key:
            headers[key.strip().lower()] = value.strip()
    return first, headers


def parse_response(buf: bytearray, closed: bool) -> tuple[Response, bool, int] | None:
    """One complete HTTP/1.1 response from buf, or None while more bytes are needed.
    Returns it, whether the connection can be reused and how many bytes it took."""
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) - start > MAX_HEAD:
                raise ValueError(f"response headers longer than {MAX_HEAD} bytes")
            return None
        status_line, headers = parse_head(buf[start:end])
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
        status = int(parts[1])
        start = end + 4
        if status >= 200:
            break  # else a 1xx interim response: the real one follows
    keep = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunked = _parse_chunked(buf, start)
        if chunked is None:
            return None
        body, end = chunked
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(buf) - start < length:
            return None
        body, end = bytes(buf[start:start + length]), start + length
    else:  # no framing: the body runs to the end of the connection
        if not closed:
            return None
        body, keep, end = bytes(buf[start:]), False, len(buf)
    return Response(status, headers, body), keep, end


def _parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at pos: (body, end position), or None while incomplete."""
    chunks: list[bytes] = []
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";", 1)[0].strip() or b"x", 16)
        pos = line_end + 2
        if size == 0:
            while True:  # trailers, up to the empty line
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                if line_end == pos:
                    return b"".join(chunks), pos + 2
                pos = line_end + 2
        if len(buf) < pos + size + 2:
            return None
        chunks.append(bytes(buf[pos:pos + size]))
        pos += size + 2  # CRLF after each chunk


def parse_request(buf: bytearray) -> tuple[str, str, dict[str, str], bytes, int] | None:
    """One complete request from buf (framed by Content-Length; no chunked uploads), or
    None while more bytes are needed: (method, target, headers, body, bytes it took).
    Raises ValueError for a garbled one."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ValueError(f"request headers longer than {MAX_HEAD} bytes")
        return None
    request_line, headers = parse_head(buf[:end])
    method, target, _ = request_line.split(" ", 2)
    length = int(headers.get("content-length") or 0)
    used = end + 4 + length
    if len(buf) < used:
        return None
    return method, target, headers, bytes(buf[end + 4:used]), used


def format_response(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    """A response with a Content-Length body; `headers` are sent as given."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
