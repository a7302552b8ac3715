"""`rlm-train bench http`: which HTTP/1.1 transport the OpenAI client runs on, and on
which event loop. The record of that decision: it times the candidates and applies the rule.

Candidates, each on asyncio's own loop and on uvloop (where installed):
  streams   the standard library's asyncio streams, with the same features as the kept
            transport (kept here only to be timed)
  protocol  a hand-written asyncio.Protocol that parses the bytes the loop hands it
            (`rlm_train.models.http`, the transport the client runs on)
  aiohttp   aiohttp's ClientSession (where installed; not a dependency of rlm-train)

(a) plain: 256 requests in flight (what a generation run keeps open: 64 episodes fanning
    out into sub-calls) to a mock server in its own process that answers at once;
    requests per second and client CPU per request (this process only). Each repeat opens
    the connections in a first round (its CPU reported apart), then times rounds of 1,024.
(b) streamed: 64 requests in flight whose answers stream one token every 5 ms (~40
    server-sent events each, what the client asks vLLM for); client CPU per request,
    with the client's own per-arrival work (note the time, count the events).
(c) burst: 256 calls at once to a server that answers each in 100 ms, one wave of
    sub-calls, on open connections; wall time (ideal 100 ms) and client CPU per burst.
The candidates take turns within each repeat, so a machine busy with other work slows
them alike. The rule reads each figure's best over the repeats (timeit's convention: other
work on the machine only adds to a figure); the table shows the median beside it.

The rule: keep the simplest candidate (streams, then aiohttp: a dependency, then
protocol: the most code of our own) whose CPU per request, plain and streamed, and burst
wall time are all within 10% of the fastest measured; run it on uvloop only where uvloop
beats asyncio's loop by more than 10% on one of those.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import statistics
import struct
import time
from typing import Any, Callable

import orjson

from rlm_train.models.http import KEEPALIVE_S, MAX_HEAD, Endpoint, Response, parse_head

CONCURRENCY = 256
PER_WORKER = 4  # requests each of the 256 workers sends in a timed round: 1,024 a round
BURST_LATENCY_S = 0.1
ROUNDS_PER_REPEAT = 3  # timed rounds (a) and bursts (b) a client runs each repeat
WITHIN = 1.10  # "as fast": within 10% of the fastest
SIMPLEST_FIRST = ["streams", "aiohttp", "protocol"]
MESSAGES = [{"role": "user", "content": "Summarize in one sentence: " + "The quick brown fox. " * 20}]
BODY = orjson.dumps({"model": "mock-model", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.0})
STREAMED_BODY = orjson.dumps({"model": "mock-model", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.0,
                              "stream": True, "stream_options": {"include_usage": True}})
STREAMED_IN_FLIGHT = 64
TOKEN_LATENCY_S = 0.005
HEADERS = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json", "Accept": "application/json"}
OnData = Callable[[bytes], None]
HEADER_LINES = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())


def _text(status: int, body: bytes) -> str:
    if status != 200:
        raise RuntimeError(f"mock server answered HTTP {status}: {body[:200]!r}")
    if body.startswith(b"data:"):
        if not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"a streamed answer without its end: {body[-200:]!r}")
        return body.decode()
    return orjson.loads(body)["choices"][0]["message"]["content"]


class _Heard:
    """What the client's `on_data` does with a streamed answer's bytes: note the time (the
    silence timeout) and count the events (progress)."""

    def __init__(self) -> None:
        self.last, self.events = 0.0, 0

    def __call__(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.events += data.count(b"data:")


# ---- the candidates: open() inside the loop, post() -> reply text, close() ----

class _Protocol:
    """The transport the client runs on: `rlm_train.models.http.Endpoint`."""

    def __init__(self, url: str):
        self.url = url

    async def open(self) -> None:
        self.endpoint: Any = Endpoint(self.url)
        self.target = self.endpoint.path + "/chat/completions"

    async def post(self, stream: bool = False) -> str:
        body, on_data = (STREAMED_BODY, _Heard()) if stream else (BODY, None)
        resp = await self.endpoint.request("POST", self.target, body, HEADER_LINES, on_data)
        return _text(resp.status, resp.body)

    async def close(self) -> None:
        self.endpoint.close()


# ---- streams: the same client on asyncio streams, timed here only ----

class _Streams(_Protocol):
    async def open(self) -> None:
        await super().open()
        self.endpoint = _StreamsEndpoint(self.url)


class _StreamsEndpoint:
    """`Endpoint` with the same features (keep-alive pool, a stale connection retried once,
    1xx skipped, Content-Length, chunked and unframed bodies, `on_data`, reset on close)
    on a reader/writer pair per connection: a ready response is read with `readuntil` and
    `readexactly`, a chunked one chunk by chunk as the reads return."""

    def __init__(self, url: str):
        origin = Endpoint(url)  # the URL read the same way
        self.host, self.port, self.host_header, self.path = origin.host, origin.port, origin.host_header, origin.path
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def request(self, method: str, target: str, body: bytes = b"", headers: str = "",
                      on_data: OnData | None = None) -> Response:
        data = (f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        now = time.monotonic()
        while self.idle:
            reader, writer, last_used = self.idle.pop()
            if now - last_used < KEEPALIVE_S and not reader.at_eof() and not writer.is_closing():
                try:
                    return await self._send(reader, writer, data, on_data)
                except _NoAnswer:
                    break  # the server had closed this idle connection: a fresh one follows
            _abort(writer)
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD)
        try:
            return await self._send(reader, writer, data, on_data)
        except _NoAnswer:
            raise EOFError("server closed the connection without answering") from None

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for _, writer, _ in idle:
            _abort(writer)

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                    on_data: OnData | None) -> Response:
        keep = False
        try:
            writer.write(data)
            response, keep = await _read_response(reader, on_data)
            return response
        finally:
            if keep:
                self.idle.append((reader, writer, time.monotonic()))
            else:
                _abort(writer)


class _NoAnswer(Exception):
    pass


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_response(reader: asyncio.StreamReader, on_data: OnData | None) -> tuple[Response, bool]:
    first = True
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if first and not getattr(exc, "partial", b""):
                raise _NoAnswer() from None
            raise EOFError("server closed the connection mid-response") from None
        except asyncio.LimitOverrunError:
            raise ValueError(f"response headers longer than {MAX_HEAD} bytes") from None
        first = False
        if on_data is not None:
            on_data(head)
        status_line, headers = parse_head(head[:-4])
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
        if int(parts[1]) >= 200:
            break
    keep = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(int(parts[1]), headers, await _read_chunked(reader, on_data)), keep
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body, keep = await reader.read(), False
    except asyncio.IncompleteReadError:
        raise EOFError("server closed the connection mid-response") from None
    if on_data is not None:
        on_data(body)
    return Response(int(parts[1]), headers, body), keep


async def _read_chunked(reader: asyncio.StreamReader, on_data: OnData | None) -> bytes:
    """Takes every complete chunk from what has arrived: one wake-up per arrival."""
    buf = bytearray()
    body: list[bytes] = []
    while True:
        while (line_end := buf.find(b"\r\n")) >= 0:
            size = int(bytes(buf[:line_end]).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                if buf.find(b"\r\n\r\n", line_end) < 0:
                    break
                return b"".join(body)
            if len(buf) < line_end + 4 + size:
                break
            body.append(bytes(buf[line_end + 2:line_end + 2 + size]))
            del buf[:line_end + 4 + size]
        data = await reader.read(1 << 16)
        if not data:
            raise EOFError("server closed the connection mid-response")
        if on_data is not None:
            on_data(data)
        buf += data


class _Aiohttp(_Protocol):
    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        self.target = self.url + "/chat/completions"

    async def post(self, stream: bool = False) -> str:
        async with self.session.post(self.target, data=STREAMED_BODY if stream else BODY, headers=HEADERS) as resp:
            if not stream:
                return _text(resp.status, await resp.read())
            heard, parts = _Heard(), []
            async for data in resp.content.iter_any():
                heard(data)
                parts.append(data)
            return _text(resp.status, b"".join(parts))

    async def close(self) -> None:
        await self.session.close()


class _Policy(_Protocol):
    """Not a candidate: OpenAIPolicy.chat on the transport it runs on (server choice, retries,
    the JSON around the request), to show what the client adds."""

    async def open(self) -> None:
        from rlm_train.models.openai_client import OpenAIPolicy

        self.policies = {stream: OpenAIPolicy("mock-model", [self.url], max_concurrency=CONCURRENCY, max_retries=0,
                                              stream=stream) for stream in (False, True)}

    async def post(self, stream: bool = False) -> str:
        return (await self.policies[stream].chat(MESSAGES)).text

    async def close(self) -> None:
        for policy in self.policies.values():
            await policy.aclose()


CANDIDATES: dict[str, tuple[type, str | None]] = {  # name -> (client, module it needs)
    "streams": (_Streams, None), "protocol": (_Protocol, None), "aiohttp": (_Aiohttp, "aiohttp"),
}
POLICY_ROW = "OpenAIPolicy.chat on protocol"


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if _installed("uvloop"):
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop
    return loops


async def _round(client: Any, per_worker: int, workers: int, stream: bool) -> tuple[float, float]:
    """(wall s, CPU s of this process) of concurrent workers, `per_worker` posts each."""

    async def worker() -> None:
        for _ in range(per_worker):
            await client.post(stream)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - wall, time.process_time() - cpu


def _session(cls: type, loop_factory: Callable[[], asyncio.AbstractEventLoop], url: str, per_worker: int,
             timed_rounds: int, workers: int = CONCURRENCY, stream: bool = False) -> list[tuple[float, float]]:
    """Open a client, run a first round (it opens the connections), then the timed rounds."""

    async def go() -> list[tuple[float, float]]:
        client = cls(url)
        await client.open()
        try:
            rounds = [await _round(client, 1, workers, stream)]
            for _ in range(timed_rounds):
                rounds.append(await _round(client, per_worker, workers, stream))
            return rounds
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(go())


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def decide(rows: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Apply the rule to rows[candidate][loop] = {"cpu_us_per_request", "burst_wall_ms", ...}."""
    measures = ("cpu_us_per_request", "streamed_cpu_us_per_request", "burst_wall_ms")
    best = {m: min(r[m] for loops in rows.values() for r in loops.values()) for m in measures}

    def as_fast(r: dict[str, float]) -> bool:
        return all(r[m] <= WITHIN * best[m] for m in measures)

    chosen = next(c for c in SIMPLEST_FIRST if c in rows and any(as_fast(r) for r in rows[c].values()))
    loops = rows[chosen]
    uvloop_helps = "uvloop" in loops and any(loops["asyncio"][m] > WITHIN * loops["uvloop"][m] for m in measures)
    return {"transport": chosen, "loop": "uvloop" if uvloop_helps else "asyncio",
            "uvloop_helps": uvloop_helps, "fastest": best,
            "as_fast": {c: [loop for loop, r in rows[c].items() if as_fast(r)] for c in rows}}


def bench_http(repeats: int = 5) -> dict[str, Any]:
    from rlm_train.testing.mock_server import mock_server_process

    loops = _loops()
    candidates = {name: cls for name, (cls, module) in CANDIDATES.items() if _installed(module)}
    runs: list[tuple[str, str, type, Callable[[], asyncio.AbstractEventLoop]]] = [
        (name, loop, cls, factory) for name, cls in candidates.items() for loop, factory in loops.items()]
    runs += [(POLICY_ROW, loop, _Policy, factory) for loop, factory in loops.items()]
    raw: dict[tuple[str, str], dict[str, list[float]]] = {
        (name, loop): {"rps": [], "cpu": [], "first_cpu": [], "streamed_cpu": [], "burst_wall": [], "burst_cpu": []}
        for name, loop, _, _ in runs}
    n = CONCURRENCY * PER_WORKER

    print(f"http: {len(runs)} clients x {repeats} repeats, taking turns; (a) {CONCURRENCY} requests in flight "
          f"to a mock server that answers at once, rounds of {n}; (b) {STREAMED_IN_FLIGHT} in flight, answers "
          f"streamed a token every {TOKEN_LATENCY_S * 1000:.0f} ms; (c) {CONCURRENCY} calls at once to a server "
          f"that answers in {BURST_LATENCY_S * 1000:.0f} ms", flush=True)
    with mock_server_process() as url:
        for rep in range(repeats):
            for name, loop, cls, factory in runs:
                (_, first_cpu), *timed = _session(cls, factory, url, PER_WORKER, ROUNDS_PER_REPEAT)
                raw[name, loop]["rps"] += [n / wall for wall, _ in timed]
                raw[name, loop]["cpu"] += [cpu / n * 1e6 for _, cpu in timed]
                raw[name, loop]["first_cpu"].append(first_cpu * 1000)
            print(f"    (a) repeat {rep + 1}/{repeats} done", flush=True)
    with mock_server_process(token_latency_ms=TOKEN_LATENCY_S * 1000) as url:
        for rep in range(repeats):
            for name, loop, cls, factory in runs:
                timed = _session(cls, factory, url, 1, ROUNDS_PER_REPEAT, STREAMED_IN_FLIGHT, stream=True)[1:]
                raw[name, loop]["streamed_cpu"] += [cpu / STREAMED_IN_FLIGHT * 1e6 for _, cpu in timed]
            print(f"    (b) repeat {rep + 1}/{repeats} done", flush=True)
    with mock_server_process(latency_ms=BURST_LATENCY_S * 1000) as url:
        for rep in range(repeats):
            for name, loop, cls, factory in runs:
                for wall, cpu in _session(cls, factory, url, 1, ROUNDS_PER_REPEAT)[1:]:
                    raw[name, loop]["burst_wall"].append(wall * 1000)
                    raw[name, loop]["burst_cpu"].append(cpu * 1000)
            print(f"    (c) repeat {rep + 1}/{repeats} done", flush=True)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for (name, loop), r in raw.items():
        table.setdefault(name, {})[loop] = {
            "requests_per_s": max(r["rps"]), "cpu_us_per_request": min(r["cpu"]),
            "cpu_us_per_request_median": _median(r["cpu"]), "first_round_cpu_ms": min(r["first_cpu"]),
            "streamed_cpu_us_per_request": min(r["streamed_cpu"]),
            "streamed_cpu_us_per_request_median": _median(r["streamed_cpu"]),
            "burst_wall_ms": min(r["burst_wall"]), "burst_wall_ms_median": _median(r["burst_wall"]),
            "burst_cpu_ms": min(r["burst_cpu"])}
    decision = decide({name: table[name] for name in candidates})
    _print_table(table, decision, repeats)
    missing = [name for name, (_, module) in CANDIDATES.items() if name not in candidates]
    missing += [] if "uvloop" in loops else ["uvloop"]
    for name in missing:
        print(f"    {name} is not installed, so not timed: pip install {name} (into this environment) to time it")
    return {"concurrency": CONCURRENCY, "repeats": repeats, "table": table, "decision": decision,
            "not_installed": missing}


def _print_table(table: dict[str, dict[str, dict[str, float]]], decision: dict[str, Any], repeats: int) -> None:
    best = decision["fastest"]
    print(f"\nhttp: the decision table (best of {repeats} repeats x {ROUNDS_PER_REPEAT}, median in brackets; "
          "client CPU only, the server runs in its own process)")
    print(f"    {'transport':30}{'loop':9}{'requests/s':>11}{'CPU/request':>15}{'streamed':>17}{'first round':>13}"
          f"{'burst wall':>17}{'burst CPU':>11}{'as fast':>9}")
    for name, loops in table.items():
        for loop, r in loops.items():
            as_fast = "-" if name == POLICY_ROW else ("yes" if loop in decision["as_fast"].get(name, []) else "no")
            cpu = f"{r['cpu_us_per_request']:.0f} ({r['cpu_us_per_request_median']:.0f}) us"
            streamed = f"{r['streamed_cpu_us_per_request']:.0f} ({r['streamed_cpu_us_per_request_median']:.0f}) us"
            burst = f"{r['burst_wall_ms']:.0f} ({r['burst_wall_ms_median']:.0f}) ms"
            print(f"    {name:30}{loop:9}{r['requests_per_s']:>11,.0f}{cpu:>15}{streamed:>17}"
                  f"{r['first_round_cpu_ms']:>10.0f} ms{burst:>17}{r['burst_cpu_ms']:>8.0f} ms{as_fast:>9}")
    print(f"    (CPU/request: (a) plain; streamed: (b); first round: CPU of the round that opens {CONCURRENCY} "
          f"connections; burst: (c), ideal {BURST_LATENCY_S * 1000:.0f} ms)")
    print(f"    fastest: {best['cpu_us_per_request']:.0f} us CPU/request, {best['streamed_cpu_us_per_request']:.0f} us "
          f"streamed, {best['burst_wall_ms']:.0f} ms burst; 'as fast' = all three within {WITHIN - 1:.0%} of those")
    loops = table[decision["transport"]]
    uv = ("uvloop helps it by more than 10%: run on uvloop" if decision["uvloop_helps"] else
          "uvloop does not help it by more than 10%: asyncio's own loop" if "uvloop" in loops else
          "uvloop is not installed: asyncio's own loop")
    print(f"    decision: {decision['transport']} (the simplest as-fast candidate, in the order "
          f"{', '.join(SIMPLEST_FIRST)}); {uv}", flush=True)
