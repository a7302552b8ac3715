"""Request bodies: read before admission, under a budget of the bytes being read at once.

A request competes for an admission place (`max_concurrent` running + `max_queue` waiting)
only once its whole body is in, so a body that trickles in holds no place honest requests
need. What it holds instead is room in the reading budget (`ReadingBudget`):

- a body reserves its Content-Length (one without it: `max_body_bytes`) before a byte of it
  is read, and keeps it until it is decoded;
- at most `max_reading_bytes` are reserved gateway-wide, `max_client_reading_bytes` per client
  address (IPv6: per /64; behind a proxy, every client has the proxy's address);
- a body that does not fit takes the room of bodies behind the pace their deadline asks for
  (less received than Content-Length x elapsed / `body_timeout_s`: at that pace they miss it),
  the most behind first: the same address's bodies when it is at its cap, anyone's when the
  gateway is. Those get 408 (and their connection closed). When that cannot make room, the new
  body is refused before a byte of it is read: 429 when its address is at its cap, else 503.

So to hold B bytes of the budget a client has to send B / body_timeout_s bytes a second, and a
body sent at once never waits for bodies that trickle. A whole body then has its JSON items
counted without decoding it (`max_body_items`) and is decoded in a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from rlm_train.errors import UserError
from rlm_train.serve.config import GatewayConfig
from rlm_train.serve.gateway_api import GatewayError, describe_errors
from rlm_train.serve.gateway_http import CLIENT_GONE

ModelT = TypeVar("ModelT", bound=BaseModel)


# ---------------------------------------------------------------------------
# The reading budget


@dataclass(eq=False)
class BodyReader:
    """One body being read: its client address, the bytes it reserved, what has arrived."""

    client: str
    reserved: int
    started: float
    evicted: asyncio.Future[str]
    """Set to the reason when another body takes this one's room."""
    received: int = 0
    released: bool = field(default=False, repr=False)

    def deficit(self, now: float, timeout_s: float) -> float:
        """Bytes this body is behind the pace that lands it by its deadline (> 0: behind)."""
        return self.reserved * min(1.0, (now - self.started) / timeout_s) - self.received


class ReadingBudget:
    """Bytes reserved by the bodies being read, gateway-wide and per client address (module docstring)."""

    def __init__(self, config: GatewayConfig, rejected: Counter[str]):
        if not config.max_body_bytes <= config.max_client_reading_bytes <= config.max_reading_bytes:
            raise UserError(f"gateway.max_body_bytes={config.max_body_bytes:,} <= gateway.max_client_reading_bytes="
                            f"{config.max_client_reading_bytes:,} <= gateway.max_reading_bytes="
                            f"{config.max_reading_bytes:,} must hold: a body one client may send has to fit the "
                            "bytes the gateway reads at once")
        self.limit = config.max_reading_bytes
        self.max_body_bytes = config.max_body_bytes
        self.client_limit = config.max_client_reading_bytes
        self.body_timeout_s = config.body_timeout_s
        self.retry_after_s = config.retry_after_s
        self.rejected = rejected  # Metrics.rejected
        self.reserved = 0
        self.peak = 0
        self.by_client: Counter[str] = Counter()
        self.readers: dict[BodyReader, None] = {}

    def enter(self, client: str, size: int) -> BodyReader:
        """Room for a body of `size` bytes from `client`: free, or taken from bodies behind their
        pace (evicted), or GatewayError 429/503 with nothing evicted."""
        now = time.monotonic()
        client_over = self.by_client[client] + size - self.client_limit
        own = self._victims(client_over, now, client, []) if client_over > 0 else []
        if own is None:
            self.rejected["client_reading_full"] += 1
            mine = sum(1 for r in self.readers if r.client == client)
            raise GatewayError(429, f"this client address is sending {mine} request bodies ({self.by_client[client]:,} "
                                    f"bytes) at once; this one's {size:,} more would pass the gateway's limit of "
                                    f"{self.client_limit:,} per address (gateway.max_client_reading_bytes); retry "
                                    f"after {self.retry_after_s} s", "rate_limit_error",
                               {"Retry-After": str(self.retry_after_s)})
        over = self.reserved - sum(r.reserved for r in own) + size - self.limit
        others = self._victims(over, now, None, own) if over > 0 else []
        if others is None:
            self.rejected["reading_full"] += 1
            raise GatewayError(503, f"the gateway is reading {self.reserved:,} bytes of request bodies at once; this "
                                    f"one's {size:,} more would pass its limit of {self.limit:,} "
                                    f"(gateway.max_reading_bytes); retry after {self.retry_after_s} s",
                               "overloaded_error", {"Retry-After": str(self.retry_after_s)})
        for victim in [*own, *others]:
            self._evict(victim, now)
        reader = BodyReader(client, size, now, asyncio.get_running_loop().create_future())
        self.readers[reader] = None
        self.reserved += size
        self.by_client[client] += size
        self.peak = max(self.peak, self.reserved)
        return reader

    def arrived(self, reader: BodyReader) -> None:
        """A body is all in: it keeps the room it uses (a chunked one reserved `max_body_bytes`)."""
        unused = reader.reserved - reader.received
        if unused > 0 and not reader.released:
            reader.reserved -= unused
            self.reserved -= unused
            self.by_client[reader.client] -= unused

    def leave(self, reader: BodyReader) -> None:
        """Give a body's room back (once; an evicted body's was given back when it was evicted)."""
        if reader.released:
            return
        reader.released = True
        self.readers.pop(reader, None)
        self.reserved -= reader.reserved
        self.by_client[reader.client] -= reader.reserved
        if self.by_client[reader.client] <= 0:
            del self.by_client[reader.client]

    def _victims(self, need: int, now: float, client: str | None,
                 exclude: list[BodyReader]) -> list[BodyReader] | None:
        """The bodies behind their pace (`client`'s only, unless None), most behind first, whose
        rooms add up to `need`; None when all of them together do not."""
        behind = sorted(((r.deficit(now, self.body_timeout_s), r) for r in self.readers
                         if (client is None or r.client == client) and r not in exclude),
                        key=lambda pair: pair[0], reverse=True)
        chosen, freed = [], 0
        for deficit, reader in behind:
            if deficit <= 0 or freed >= need:
                break
            chosen.append(reader)
            freed += reader.reserved
        return chosen if freed >= need else None

    def _evict(self, reader: BodyReader, now: float) -> None:
        self.rejected["slow_body"] += 1
        self.leave(reader)
        reader.evicted.set_result(
            f"the request's body arrived too slowly ({reader.received:,} of {reader.reserved:,} bytes in "
            f"{now - reader.started:.1f} s: at this pace it misses the {self.body_timeout_s:g} s deadline) and "
            "its room was given to another body; send it at once, or retry")


def address_key(host: str) -> str:
    """What a client's room is counted by: its IP address, an IPv6 one by its /64 (one host
    usually holds a whole /64, so counting single addresses would not bound it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# ---------------------------------------------------------------------------
# Reading, counting, decoding


async def read_json(request: Request, model: type[ModelT], budget: ReadingBudget, max_items: int) -> ModelT:
    """The request's body as `model`: read under the reading budget (the edge has capped its
    size), its items counted and decoded in a thread; its room is given back once it is decoded."""
    length = request.headers.get("content-length")
    chunked = length is None and "transfer-encoding" in request.headers
    size = budget.max_body_bytes if chunked else int(length) if length is not None and length.isdigit() else 0
    if size == 0:
        return await _decoded(budget, b"", model, max_items)
    reader = budget.enter(address_key(request.client.host) if request.client else "unknown client", size)
    try:
        body = bytearray()
        more = True
        while more:
            receiving = asyncio.ensure_future(request.receive())
            either: set[asyncio.Future[Any]] = {receiving, reader.evicted}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if reader.evicted.done():  # even with data in: its room is someone else's now
                receiving.cancel()
                raise GatewayError(408, reader.evicted.result(), "timeout_error")
            message = receiving.result()
            if message["type"] != "http.request":
                raise GatewayError(CLIENT_GONE, "the client left before sending its body", "invalid_request_error")
            chunk = message.get("body", b"")
            body += chunk
            reader.received += len(chunk)
            more = message.get("more_body", False)
        budget.arrived(reader)
        return await _decoded(budget, body, model, max_items)
    finally:
        budget.leave(reader)


async def _decoded(budget: ReadingBudget, body: bytes | bytearray, model: type[ModelT], max_items: int) -> ModelT:
    """`decode_body`, in a thread unless the body is empty; its refusals counted."""
    try:
        return await asyncio.to_thread(decode_body, body, model, max_items) if body else \
            decode_body(body, model, max_items)
    except GatewayError as exc:
        budget.rejected["too_large" if exc.status_code == 413 else "invalid"] += 1
        raise


# Every byte but quotes and the characters that open a JSON item: what the item count looks at.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'",[{')


def count_json_items(body: bytes | bytearray, limit: int) -> int:
    """How many items (array elements and object members, and the text itself) a JSON text holds
    at most, counted without decoding it: 1 + its commas, `[` and `{` outside strings. Above
    `limit` it may stop early: then it returns some count over `limit`."""
    rough = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if rough <= limit:
        return rough
    # Outside strings only: drop escaped backslashes and escaped quotes, keep only quotes and
    # item openers; then every quote delimits a string, and every two strings make an item at least.
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    compact = body.translate(None, _NOT_STRUCTURE)
    strings = compact.count(b'"') // 2
    if (strings + 1) // 2 > limit:
        return (strings + 1) // 2
    return 1 + sum(map(len, compact.split(b'"')[::2]))


def decode_body(body: bytes | bytearray, model: type[ModelT], max_items: int) -> ModelT:
    """A request body as `model`: its items counted first (413 past `max_items`), then decoded."""
    items = count_json_items(body, max_items)
    if items > max_items:
        raise GatewayError(413, f"the body holds more than {max_items:,} JSON items (gateway.max_body_items); send "
                                "a big context as text, or as a file (context_path)", "request_too_large")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(422, f"invalid request: the body is not valid JSON ({exc})",
                           "invalid_request_error") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise GatewayError(422, describe_errors(exc.errors()), "invalid_request_error") from None
