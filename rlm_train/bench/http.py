"""`rlm-train bench http`: our HTTP/1.1 client (`rlm_train.models.http`) against httpx and
aiohttp, the libraries it replaces, on the same local mock server in its own process.

(a) throughput: 256 requests in flight (what a generation run keeps open: 64 episodes
    fanning out into sub-calls) to a server that answers at once; client requests per
    second and client CPU per request (this process only: the server's CPU is reported
    apart). The first round opens the connections and is reported on its own.
(b) burst: 256 calls at once to a server that answers each in 100 ms, as one wave of
    sub-calls; ideal wall time 100 ms. The first burst opens the connections.

Besides the libraries, the table has our transport on asyncio's own event loop instead
of uvloop, the same requests on asyncio streams (the design `rlm_train.models.http`
chose a protocol over), and the full `OpenAIPolicy.chat` (retries, server choice, JSON)
on top of our transport. httpx, httpx2 and aiohttp are timed only where installed;
they are not dependencies of rlm-train.
"""

from __future__ import annotations

import asyncio
import importlib
import statistics
import time
from typing import Any, Callable

import orjson

from rlm_train import eventloop
from rlm_train.models.http import Endpoint, parse_head

CONCURRENCY = 256
PER_WORKER = 4  # requests each of the 256 workers sends per round: 1024 per round
BURST_LATENCY_S = 0.1
MESSAGES = [{"role": "user", "content": "Summarize in one sentence: " + "The quick brown fox. " * 20}]
BODY = {"model": "mock-model", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.0}
HEADERS = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json", "Accept": "application/json"}
HEADER_LINES = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())


def _text(status: int, body: bytes) -> str:
    if status != 200:
        raise RuntimeError(f"mock server answered HTTP {status}: {body[:200]!r}")
    return orjson.loads(body)["choices"][0]["message"]["content"]


# ---- the clients: open() inside the loop, post(body) -> reply text, close() ----

class _Ours:
    def __init__(self, url: str):
        self.url = url

    async def open(self) -> None:
        self.endpoint = Endpoint(self.url)
        self.target = self.endpoint.path + "/chat/completions"

    async def post(self, body: bytes) -> str:
        resp = await self.endpoint.request("POST", self.target, body, HEADER_LINES)
        return _text(resp.status, resp.body)

    async def close(self) -> None:
        self.endpoint.close()


class _Streams(_Ours):
    """The same requests on asyncio streams (reader/writer pairs), same head parser."""

    async def open(self) -> None:
        await super().open()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes) -> str:
        ep = self.endpoint
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(ep.host, ep.port)
        reader, writer = conn
        writer.write((f"POST {self.target} HTTP/1.1\r\nHost: {ep.host_header}\r\n{HEADER_LINES}"
                      f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body)
        status_line, headers = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        data = await reader.readexactly(int(headers["content-length"]))
        self.idle.append(conn)
        return _text(int(status_line.split()[1]), data)

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class _Policy(_Ours):
    """OpenAIPolicy.chat: our transport plus server choice, retries and the JSON around it."""

    async def open(self) -> None:
        from rlm_train.models.openai_client import OpenAIPolicy

        # Not streamed: the other clients here send the same plain (non-streamed) request.
        self.policy = OpenAIPolicy("mock-model", [self.url], max_concurrency=CONCURRENCY, max_retries=0, stream=False)

    async def post(self, body: bytes) -> str:
        return (await self.policy.chat(MESSAGES)).text  # encodes its own body

    async def close(self) -> None:
        await self.policy.aclose()


class _Httpx(_Ours):
    module = "httpx"

    async def open(self) -> None:
        lib = importlib.import_module(self.module)
        limits = lib.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        self.client = lib.AsyncClient(limits=limits, timeout=60)
        self.target = self.url + "/chat/completions"

    async def post(self, body: bytes) -> str:
        resp = await self.client.post(self.target, content=body, headers=HEADERS)
        return _text(resp.status_code, resp.content)

    async def close(self) -> None:
        await self.client.aclose()


class _Httpx2(_Httpx):
    module = "httpx2"


class _Aiohttp(_Ours):
    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
        self.target = self.url + "/chat/completions"

    async def post(self, body: bytes) -> str:
        async with self.session.post(self.target, data=body, headers=HEADERS) as resp:
            return _text(resp.status, await resp.read())

    async def close(self) -> None:
        await self.session.close()


# label -> (client class, event loop factory, module it needs, how to install it)
CLIENTS: dict[str, tuple[type, Callable[[], asyncio.AbstractEventLoop], str | None, str | None]] = {
    "rlm_train.models.http": (_Ours, eventloop.new_event_loop, None, None),
    "  same, asyncio's own loop": (_Ours, asyncio.new_event_loop, None, None),
    "  same on asyncio streams": (_Streams, eventloop.new_event_loop, None, None),
    "  OpenAIPolicy.chat on it": (_Policy, eventloop.new_event_loop, None, None),
    "httpx": (_Httpx, eventloop.new_event_loop, "httpx", "pip install httpx"),
    "httpx2": (_Httpx2, eventloop.new_event_loop, "httpx2", "pip install httpx2"),
    "aiohttp": (_Aiohttp, eventloop.new_event_loop, "aiohttp", "pip install aiohttp"),
}
BASELINE = "rlm_train.models.http"


def _installed(module: str | None) -> bool:
    if module is None:
        return True
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], main) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


async def _round(client: Any, workers: int, per_worker: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) of `workers` concurrent loops of `per_worker` posts."""

    async def worker() -> None:
        for _ in range(per_worker):
            await client.post(orjson.dumps(BODY))

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - wall, time.process_time() - cpu


def _throughput(cls: type, loop_factory, url: str, rounds: int) -> dict[str, Any]:
    async def go():
        client = cls(url)
        await client.open()
        try:
            first = await _round(client, CONCURRENCY, 1)  # opens the connections
            timed = [await _round(client, CONCURRENCY, PER_WORKER) for _ in range(rounds)]
        finally:
            await client.close()
        return first, timed

    (first_wall, first_cpu), timed = _run_on(loop_factory, go())
    n = CONCURRENCY * PER_WORKER
    return {"requests_per_s": statistics.median(n / w for w, _ in timed),
            "cpu_us_per_request": statistics.median(c / n for _, c in timed) * 1e6,
            "first_round_cpu_ms": first_cpu * 1000, "first_round_wall_ms": first_wall * 1000,
            "rounds": rounds, "requests_per_round": n}


def _burst(cls: type, loop_factory, url: str, bursts: int) -> dict[str, Any]:
    async def go():
        client = cls(url)
        await client.open()
        try:
            return [await _round(client, CONCURRENCY, 1) for _ in range(bursts + 1)]
        finally:
            await client.close()

    walls = [w for w, _ in _run_on(loop_factory, go())]
    return {"cold_wall_ms": walls[0] * 1000, "warm_wall_ms": statistics.median(walls[1:]) * 1000,
            "warm_vs_ideal": statistics.median(walls[1:]) / BURST_LATENCY_S, "bursts": bursts}


def _server_cpu_s() -> float:
    """CPU seconds of the mock server process(es) this process started."""
    import psutil

    total = 0.0
    for child in psutil.Process().children():
        try:
            if "rlm_train.testing.mock_server" in " ".join(child.cmdline()):
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_http(repeats: int = 5) -> dict[str, Any]:
    from rlm_train.testing.mock_server import mock_server_process

    results: dict[str, Any] = {"concurrency": CONCURRENCY, "throughput": {}, "burst": {}, "not_installed": {}}
    clients = {label: c for label, c in CLIENTS.items() if _installed(c[2])}
    results["not_installed"] = {label: c[3] for label, c in CLIENTS.items() if label not in clients}
    rounds = max(1, repeats)

    print(f"http (a): {CONCURRENCY} requests in flight to a local mock server that answers at once "
          f"(its own process); median of {rounds} rounds of {CONCURRENCY * PER_WORKER} requests", flush=True)
    print(f"    {'client':30}{'requests/s':>12}{'CPU/request':>14}{'vs ours':>9}{'first round CPU':>18}"
          f"{'server CPU/request':>21}")
    with mock_server_process() as url:
        for label, (cls, loop_factory, _, _) in clients.items():
            server_cpu = _server_cpu_s()
            r = _throughput(cls, loop_factory, url, rounds)
            served = CONCURRENCY + rounds * CONCURRENCY * PER_WORKER
            r["server_cpu_us_per_request"] = (_server_cpu_s() - server_cpu) / served * 1e6
            results["throughput"][label.strip()] = r
            base = results["throughput"][BASELINE]["cpu_us_per_request"]
            print(f"    {label:30}{r['requests_per_s']:>12,.0f}{r['cpu_us_per_request']:>11.0f} us"
                  f"{r['cpu_us_per_request'] / base:>8.1f}x{r['first_round_cpu_ms']:>15.0f} ms"
                  f"{r['server_cpu_us_per_request']:>18.0f} us", flush=True)
    print("    (CPU/request: this process, the client; first round: the one that opens the connections; "
          "server: the mock server's process, first round included)")

    print(f"http (b): {CONCURRENCY} calls at once to a server that answers in {BURST_LATENCY_S * 1000:.0f} ms "
          f"(ideal {BURST_LATENCY_S * 1000:.0f} ms); median of {rounds} bursts on open connections", flush=True)
    print(f"    {'client':30}{'first burst':>13}{'later bursts':>14}{'vs ideal':>10}")
    with mock_server_process(latency_ms=BURST_LATENCY_S * 1000) as url:
        for label, (cls, loop_factory, _, _) in clients.items():
            r = _burst(cls, loop_factory, url, rounds)
            results["burst"][label.strip()] = r
            print(f"    {label:30}{r['cold_wall_ms']:>10.0f} ms{r['warm_wall_ms']:>11.0f} ms"
                  f"{r['warm_vs_ideal']:>9.2f}x", flush=True)
    for label, how in results["not_installed"].items():
        print(f"    {label} is not installed, so not timed; to time it: {how} (into this environment; "
              "rlm-train does not depend on it)")
    return results
