"""The gateway's HTTP edge: what a connection and a request must show before the gateway does
any work for them, so that a hostile client costs little and honest ones are still served.

Connections (`GuardedH11Protocol`: uvicorn's h11 protocol with deadlines and a cap):
- a request's headers must arrive within `header_timeout_s` of the connection opening (or of
  its previous response), its body within `body_timeout_s` of its headers; else 408, closed.
  uvicorn itself only times out idle keep-alive connections, never a half-sent request
  (slowloris), hence the subclass (h11 also when httptools is installed).
- at most `max_connections` open (and at most half the process's descriptor limit): a new
  connection past the cap evicts the one that has waited longest for its request to arrive,
  or gets 503 when every open connection is being answered.

Requests (`Edge`, the outermost ASGI layer), before any body is read: the Host header
(loopback names, IP literals, this machine's name and `allowed_hosts`; a web page whose own
domain was rebound to this address sends that domain: 403) and the bearer token (neither for
/health), Content-Length over `max_body_bytes` (413). The endpoint then reads the body under
the reading budget and decodes it (gateway_body.py), and only then takes its admission place
(429 when full). `context_path` is checked for length and components before any path
resolution, which runs in a thread (`check_context_path`, `find_context_file`).

Every request is one access line in the operator's log once its response is sent (the
`rlm_train.serve.gateway.access` logger): client address, method, path, status, seconds from
its headers to its last byte, and the tokens its episode spent; every refused one also gets a
line with the reason (the `rlm_train.serve.gateway` logger; `GatewayThread` prints both to
stderr). Error bodies carry no host paths (`gateway_api.scrub_paths`).
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import logging
import os
import resource
import secrets
import socket
import time
from pathlib import Path
from collections import Counter
from typing import TYPE_CHECKING, Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway_api import _ENDPOINTS, GatewayError, _error_body, _too_large

if TYPE_CHECKING:
    from rlm_train.serve.gateway import Gateway

log = logging.getLogger("rlm_train.serve.gateway")
access_log = logging.getLogger("rlm_train.serve.gateway.access")
access_log.setLevel(logging.INFO)
# uvicorn's own warnings about bad requests carry no client address: our one-line refusals replace them.
_uvicorn_log = logging.getLogger("rlm_train.serve.gateway.uvicorn")
_uvicorn_log.setLevel(logging.ERROR)

CONTEXT_PATH_MAX_CHARS = 1024
CONTEXT_PATH_MAX_PARTS = 32
CLIENT_GONE = 499  # the client left before its request was read: logged by whoever closed it, never sent


def refused(client: str, what: str, status: int, reason: str) -> None:
    """The operator's one line for a refused (4xx) or failed (5xx) request."""
    verb = "failed" if status >= 500 and status != 503 else "refused"  # 503: the gateway's limits, not a fault
    log.warning("%s %s %s: %d %s", verb, client, what[:200], status, reason)


def log_access(client: str, method: str, path: str, status: int, seconds: float, tokens: int | None) -> None:
    """The operator's access line for one request (CLIENT_GONE: the client left before its end)."""
    access_log.info("access %s %s %s %d %.3f s %s tokens", client, method, path[:200], status, seconds,
                    "-" if tokens is None else tokens)


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown client"


# ---------------------------------------------------------------------------
# Connections


class ConnectionGuard:
    """Deadlines and the connection cap of one server, and the connections waiting for their
    request (oldest first: who is evicted at the cap)."""

    def __init__(self, config: GatewayConfig, rejected: Counter[str]):
        self.header_timeout_s = config.header_timeout_s
        self.body_timeout_s = config.body_timeout_s
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # The other half stays for the sandboxes' pipes, upstream connections and context files.
        self.max_connections = config.max_connections if soft_limit == resource.RLIM_INFINITY \
            else max(1, min(config.max_connections, soft_limit // 2))
        self.rejected = rejected  # Metrics.rejected
        self.waiting: dict[GuardedH11Protocol, None] = {}  # insertion order: who waits longest first

    def make_room(self, new: "GuardedH11Protocol") -> None:
        """Called with each new connection: past the cap, evict the oldest waiting one, or refuse `new`."""
        if len(new.connections) <= self.max_connections:
            return
        oldest = next((c for c in self.waiting if c is not new), None)
        if oldest is not None:
            oldest.refuse(503, "the gateway is at its connection limit and this connection had not sent its "
                               "request; retry", "connection_limit")
        else:
            new.refuse(503, f"the gateway is at its connection limit ({self.max_connections} open, all being "
                            "answered); retry", "connection_limit", even_if_idle=True)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers and body, and the
    server's connection cap (see the module docstring). `guard` is set per server by
    `guarded_protocol`."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _uvicorn_log
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" | "body" | None (being answered)
        self._request_bytes = 0  # of the request being received, while its headers arrive

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("headers")
        self.guard.make_room(self)

    def data_received(self, data: bytes) -> None:
        self._request_bytes += len(data)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._log_refusal(400, "malformed HTTP request (or its headers over 16 KiB)")
        self.guard.rejected["malformed"] += 1
        super().send_400_response(msg)
        self._enter(None)

    def _follow(self) -> None:
        """Move to the phase h11 says the request is in."""
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase and not self.transport.is_closing():
            self._enter(phase)

    def _enter(self, phase: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if phase == "headers":
            self._request_bytes = 0
            self.guard.waiting.pop(self, None)
            self.guard.waiting[self] = None  # to the end: it waits from now
        elif phase is None:
            self.guard.waiting.pop(self, None)
        self._phase = phase
        if phase is not None:
            seconds = self.guard.header_timeout_s if phase == "headers" else self.guard.body_timeout_s
            self._timer = self.loop.call_later(seconds, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the gateway stopped reading (flow control), not the client
            self._enter(self._phase)
            return
        if self._phase == "headers":
            self.refuse(408, f"the request's headers did not arrive within {self.guard.header_timeout_s:g} s",
                        "header_timeout")
        else:
            self.refuse(408, f"the request's body did not arrive within {self.guard.body_timeout_s:g} s of its "
                             "headers", "body_timeout")

    def refuse(self, status: int, reason: str, metric: str, *, even_if_idle: bool = False) -> None:
        """Answer `status` (unless this request's response has started), log it, close. A
        connection that sent nothing of a request is closed silently (as uvicorn closes an idle
        keep-alive one) unless `even_if_idle`."""
        self.guard.rejected[metric] += 1
        idle = self._phase == "headers" and self._request_bytes == 0 and not even_if_idle
        answered = self._phase != "headers" and self.cycle is not None and self.cycle.response_started
        if not idle and not answered:
            body = _error_body(status, reason, "timeout_error" if status == 408 else "overloaded_error")
            head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            self.transport.write(head + body)
            self._log_refusal(status, reason)
        self._enter(None)
        self.connections.discard(self)  # at once: the cap counts open connections, not closing ones
        self.transport.close()

    def _log_refusal(self, status: int, reason: str) -> None:
        client = _client({"client": self.client})
        what = "(before its request line)" if self._phase == "headers" else \
            f"{self.scope['method']} {self.scope['path']}" if self.scope else "(connection)"
        refused(client, what, status, reason)


def guarded_protocol(config: GatewayConfig, rejected: Counter[str]) -> type[GuardedH11Protocol]:
    """The protocol class one uvicorn server uses (`uvicorn.Config(http=...)`): its own guard."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": ConnectionGuard(config, rejected)})


# ---------------------------------------------------------------------------
# Requests: Host, token, Content-Length


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Which Host headers this gateway answers: DNS rebinding sends the attacker's own domain."""

    def __init__(self, config: GatewayConfig):
        names = {"localhost", socket.gethostname().lower(), config.host.lower()}
        allowed = [name.lower().rstrip(".") for name in config.allowed_hosts]
        self.any = "*" in allowed
        self.names = names | {name for name in allowed if not name.startswith(".")}
        self.suffixes = tuple(name for name in allowed if name.startswith("."))

    def refusal(self, header: bytes | None) -> str | None:
        """Why a request with this Host header is refused (None: let it in)."""
        if header is None or self.any:  # HTTP/1.0 without Host: not a browser
            return None
        text = header.decode("latin-1").strip().lower()
        name = text[1:text.find("]")] if text.startswith("[") else text.rpartition(":")[0] if ":" in text else text
        name = name.rstrip(".")
        if name in self.names or name.endswith(self.suffixes):
            return None
        try:
            ipaddress.ip_address(name)
            return None  # an address: no name a web page could rebind
        except ValueError:
            pass
        return (f"Host {text[:100]!r} is not a name of this gateway (a web page on another domain, DNS rebinding?); "
                "add it to gateway.allowed_hosts")


class Edge:
    """Outermost ASGI layer: Host, token and Content-Length before any body is read, the
    status counts per endpoint, and one log line per refused request."""

    def __init__(self, app: Any, gateway: "Gateway"):
        self.app = app
        self.gateway = gateway
        self.hosts = HostCheck(gateway.config)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        what = f"{scope.get('method', '')} {path}"
        gateway = self.gateway
        headers = dict(scope.get("headers") or [])
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        body_read = not has_body
        limit = gateway.config.max_body_bytes
        received = 0
        refusal = 0  # the status of a refusal whose log line waits for its body (the reason)
        started = time.monotonic()
        status = CLIENT_GONE  # until a response starts
        logged = False
        state = scope.setdefault("state", {})  # the endpoint notes its episode's tokens there (rlm_tokens)

        def access() -> None:
            nonlocal logged
            if not logged:
                logged = True
                log_access(_client(scope), scope.get("method", ""), path, status, time.monotonic() - started,
                           state.get("rlm_tokens"))

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal refusal, status
            if message["type"] == "http.response.start":
                status = message["status"]
                gateway.metrics.requests[(endpoint, status)] += 1
                if status >= 400 and status != CLIENT_GONE:
                    refusal = status
                    if not body_read:  # its body stays unread: the connection cannot be reused
                        message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and refusal:
                refused(_client(scope), what, refusal, _error_message(message.get("body", b"")))
                refusal = 0
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                access()

        async def counted_receive() -> dict[str, Any]:
            nonlocal body_read, received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    gateway.metrics.rejected["too_large"] += 1
                    raise GatewayError(413, _too_large(limit), "request_too_large")
                body_read = not message.get("more_body", False)
            return message

        if path != "/health":  # health probes name the node as they please, and learn nothing
            why = self.hosts.refusal(headers.get(b"host"))
            if why is not None:
                gateway.metrics.rejected["host"] += 1
                await _send_error(counted_send, 403, why, "permission_error")
                return
            why = gateway.auth_refusal(headers.get(b"authorization", b"").decode("latin-1"))
            if why is not None:
                await _send_error(counted_send, 401, why, "authentication_error", [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            gateway.metrics.rejected["too_large"] += 1
            await _send_error(counted_send, 413, _too_large(limit), "request_too_large")
            return
        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            access()  # a response cut short (client gone, a bug) is logged too


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace") or "(no reason given)"


async def _send_error(send: Any, status: int, message: str, kind: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def asgi_app(app: Any) -> Any:
    """The app inside its edge layer (Host, token, body size, refusal log): what uvicorn serves."""
    return Edge(app, app.state.gateway)


# ---------------------------------------------------------------------------
# Context files


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 80 else raw[:60] + "..." + raw[-17:])


def check_context_path(raw: str) -> None:
    """Limits on a context_path checked before anything resolves it (resolving is quadratic in
    its components)."""
    if len(raw) > CONTEXT_PATH_MAX_CHARS:
        raise GatewayError(422, f"context_path is {len(raw):,} characters, over the gateway's limit of "
                                f"{CONTEXT_PATH_MAX_CHARS:,}", "invalid_request_error")
    if raw.count("/") >= CONTEXT_PATH_MAX_PARTS:
        raise GatewayError(422, f"context_path has {raw.count('/') + 1} components, over the gateway's limit of "
                                f"{CONTEXT_PATH_MAX_PARTS}", "invalid_request_error")
    if "\x00" in raw:
        raise GatewayError(422, "context_path contains a NUL byte", "invalid_request_error")


def find_context_file(raw: str, dirs: list[Path], max_bytes: int) -> Path:
    """A context_path resolved (symlinks too) inside an allowed directory, or 403/404/413/422.
    Blocking (it resolves paths on disk): call it in a thread. Messages name no directory."""
    if not dirs:
        raise GatewayError(403, "context files are off on this gateway: send the context inline, or start it "
                                "with --context-dir DIR", "permission_error")
    try:
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [d / given for d in dirs]
        inside = [real for real in (c.resolve() for c in candidates)
                  if any(real == d or real.is_relative_to(d) for d in dirs)]
        if not inside:
            raise GatewayError(403, f"context_path {_shown(raw)} is outside the directories this gateway reads "
                                    "contexts from", "permission_error")
        for real in inside:
            if real.is_file():
                size = real.stat().st_size
                if size > max_bytes:
                    raise GatewayError(413, f"context_path {_shown(raw)} is {size:,} bytes, over the gateway's "
                                            f"limit of {max_bytes:,}", "request_too_large")
                return real
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long, a symlink loop, unencodable text
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            "a symlink loop" if isinstance(exc, RuntimeError) else type(exc).__name__
        raise GatewayError(422, f"context_path {_shown(raw)} cannot be resolved ({why})", "invalid_request_error") \
            from None
    raise GatewayError(404, f"context_path {_shown(raw)}: no such file in the allowed directories", "not_found_error")


# ---------------------------------------------------------------------------
# A token when the gateway is reachable from other machines


def token_file(port: int) -> Path:
    from rlm_train.models.loading import cache_root

    return cache_root() / "serve" / f"gateway-{port}.token"


def generate_token(gateway: "Gateway", host: str, port: int) -> Path | None:
    """Bound to a non-loopback address without --token-env: a new random token for this run,
    required from then on and written (mode 600) to the file returned; else None."""
    if gateway.token is not None or is_loopback(host):
        return None
    from rlm_train.serve.vllm_auth import write_private

    path = token_file(port)
    path.parent.mkdir(parents=True, exist_ok=True)
    gateway.token = secrets.token_urlsafe(32)
    write_private(path, gateway.token + "\n")
    return path


def remove_token_file(path: Path | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
