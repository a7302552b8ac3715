"""Hostile clients of the RLM gateway, the mock model's side of them, and honest clients to
measure beside them (tests/test_gateway_load.py, tests/test_gateway_tree.py).

`attack_responder` is a mock server responder (importable by name, so a mock server in its
own process can run it): a root episode whose query says what to do plays it, anything else
plays the benchmark scenario (rlm_train/bench/scenario.py), which is the honest traffic.

    FANOUT n TAG   the root fans out n child RLMs (CHILD TAG i) that answer at once
    LLMFAN n       the root's cell asks llm_query_batched for n prompts at once
    NEST           rlm_query two deep (CHILD NEST asks for CHILD DEEP)
    STRAND         two children: CHILD LOOP calls the sub-model in a loop, CHILD SLEEP sleeps

The attacks: `slowloris` (half-sent headers, or with `body=True` a body trickling in),
`huge_bodies`, `long_context_paths`, `foreign_host` (DNS rebinding), `fanout_bombs` (child RLMs
and sub-calls), `disconnecting_streamers`; `run_all` (or `python -m
rlm_train.testing.gateway_attacks`) runs them all at once. Each runs in its own thread until
`stop` is set and counts what it saw in `tally` (a Counter, keys "ATTACK OUTCOME"): the status
codes it got back, connections closed on it.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable

from rlm_train.bench.scenario import scenario_context, scenario_responder

_DIRECTIVE = re.compile(r"FANOUT (\d+) (\w+)|LLMFAN (\d+)|CHILD (\w+)|NEST|STRAND")
HONEST_QUERY = "What is the answer?"


def _cell(code: str) -> str:
    return "```repl\n" + code + "\n```"


def attack_responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The mock model: plays the directive in a root's or child's query (module docstring)."""
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    if not any(m.get("role") == "system" for m in messages):
        return "pong" if users and users[-1] == "ping" else "a short summary"
    found = _DIRECTIVE.search(users[0]) if users and isinstance(users[0], str) else None
    if found is None:
        return scenario_responder(messages, body)
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    what = found.group(0)
    if turn > 0:
        return _cell("FINAL('done')")
    if found.group(1):
        return _cell(f"r = rlm_query_batched(['CHILD {found.group(2)} ' + str(i) for i in range({found.group(1)})])\n"
                     "print(sorted(set(r)))")
    if found.group(3):
        return _cell(f"r = llm_query_batched(['fan ' + str(i) for i in range({found.group(3)})])\nprint(len(r))")
    code = {
        "NEST": "print(rlm_query('CHILD NEST'))",
        "CHILD NEST": "FINAL(rlm_query('CHILD DEEP'))",
        "STRAND": "print(rlm_query_batched(['CHILD LOOP', 'CHILD SLEEP']))",
        "CHILD LOOP": "import time\nfor i in range(400):\n    llm_query('ping')\n    time.sleep(0.05)\nFINAL('looped')",
        "CHILD SLEEP": "import time\ntime.sleep(60)\nFINAL('slept')",
    }.get(what, "FINAL('ok')")
    return _cell(code)


# ---------------------------------------------------------------------------
# HTTP helpers


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout_s: float = 120.0) -> tuple[int, bytes]:
    """(status, body) of one request on a fresh connection; a connection the server cut is status 0."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def post_json(port: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return request(port, "POST", "/v1/rlm", json.dumps(payload).encode(), headers)


def metric(port: int, name: str) -> float:
    """One sample of the gateway's /metrics (nan when it is not there)."""
    status, text = request(port, "GET", "/metrics", timeout_s=30)
    found = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(errors="replace"), re.M) if status == 200 else None
    return float(found.group(1)) if found else float("nan")


# ---------------------------------------------------------------------------
# Honest clients


class Honest:
    """Clients that each send one scenario request every `period_s` (a steady rate, not a
    closed loop) and record the latency of each one answered right, and every other one."""

    def __init__(self, port: int, clients: int, period_s: float):
        self.port, self.clients, self.period_s = port, clients, period_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._n = 0

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._client, args=(i, seconds)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, index: int, seconds: float) -> None:
        start = time.monotonic() + index * self.period_s / self.clients  # spread the clients over a period
        end = time.monotonic() + seconds
        tick = start
        while tick < end:
            time.sleep(max(0.0, tick - time.monotonic()))
            with self._lock:
                self._n += 1
                key = f"k{self._n}"
            began = time.monotonic()
            status, body = post_json(self.port, {"query": HONEST_QUERY,
                                                 "context": scenario_context(key, "Filler text. ", 1600)})
            took = time.monotonic() - began
            answer = json.loads(body).get("answer") if status == 200 else None
            with self._lock:
                if answer == key:
                    self.latencies.append(took)
                else:
                    self.failures.append(f"{status} {body[:200]!r}")
            tick += self.period_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------
# Attacks


def _loop(stop: threading.Event, tally: Counter[str], name: str, once: Callable[[], str], pause_s: float) -> None:
    while not stop.is_set():
        outcome = once()
        tally[f"{name} {outcome}"] += 1
        stop.wait(max(pause_s, 0.2) if " 429 " in f" {outcome} " else pause_s)  # as a client that reads Retry-After


def slowloris(port: int, stop: threading.Event, tally: Counter[str], sockets: int, body: bool = False) -> None:
    """Hold `sockets` connections that send a request's headers one line every second (or,
    with `body`, whole headers and then a 1 MB body one byte a second), and reopen each one
    the gateway closes."""
    name = "slow body" if body else "slowloris"
    head = f"POST /v1/rlm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode()
    if body:
        head += b"Content-Length: 1000000\r\n\r\n{"
    drip = b" " if body else b"X-Slow: 1\r\n"
    held: list[socket.socket] = []

    def open_one() -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head)
            sock.setblocking(False)
            held.append(sock)
            tally[f"{name} opened"] += 1
        except OSError:
            tally[f"{name} refused at connect"] += 1

    try:
        while not stop.is_set():
            while len(held) < sockets and not stop.is_set():
                open_one()
            tally[f"{name} held (max)"] = max(tally[f"{name} held (max)"], len(held))
            for sock in list(held):
                try:
                    try:
                        sock.recv(4096)  # a 408 or a close: the gateway gave up on it
                        raise ConnectionError
                    except BlockingIOError:
                        pass  # nothing from the gateway: still held
                    sock.send(drip)
                except OSError:
                    tally[f"{name} closed by the gateway"] += 1
                    held.remove(sock)
                    sock.close()
            stop.wait(1.0)
    finally:
        for sock in held:
            sock.close()


def huge_bodies(port: int, stop: threading.Event, tally: Counter[str]) -> None:
    """Bodies the gateway must not read or decode: a declared 2 GB, and a real 30 MB of
    tiny JSON items (cheap to send, costly to decode)."""
    many_items = b'{"query": "q", "context": [' + b"0," * 15_000_000 + b"0]}"

    def declared() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(f"POST /v1/rlm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {2 << 30}\r\n\r\n".encode() + b'{"query": "' + b"x" * 65536)
                return sock.recv(100).split(b" ", 2)[1].decode() or "closed"
        except (OSError, IndexError):
            return "closed"

    def items() -> str:
        return str(request(port, "POST", "/v1/rlm", many_items, timeout_s=60)[0])

    flip = [False]

    def either() -> str:
        flip[0] = not flip[0]
        return ("declared 2GB " + declared()) if flip[0] else ("30MB of items " + items())

    _loop(stop, tally, "huge body", either, 0.2)


def long_context_paths(port: int, stop: threading.Event, tally: Counter[str]) -> None:
    """context_path values that were quadratic to resolve: 470 kB of components, and dot-dots."""
    paths = ["a/" * 235_000 + "x", "../" * 150_000 + "etc/passwd", "./" * 200_000 + "doc.txt"]
    turn = [0]

    def once() -> str:
        turn[0] += 1
        return str(post_json(port, {"query": "q", "context_path": paths[turn[0] % len(paths)]})[0])

    _loop(stop, tally, "long context_path", once, 0.05)


def foreign_host(port: int, stop: threading.Event, tally: Counter[str], secret: str) -> None:
    """A web page whose domain was rebound to the gateway's address: its Host is that domain."""
    def once() -> str:
        status, body = post_json(port, {"query": "q", "context_path": "doc.txt"}, {"Host": "evil.example.com"})
        return "LEAKED" if secret and secret.encode() in body else str(status)

    _loop(stop, tally, "foreign Host", once, 0.1)


def fanout_bombs(port: int, stop: threading.Event, tally: Counter[str], bombs: int, children: int,
                 prompts: int) -> None:
    """`bombs` clients, each sending one request at a time that fans out `children` child RLMs
    or `prompts` sub-calls in one llm_query_batched."""
    def bomber(i: int) -> None:
        flip = [False]

        def once() -> str:
            flip[0] = not flip[0]
            query = f"FANOUT {children} bomb{i}" if flip[0] else f"LLMFAN {prompts}"
            status, body = post_json(port, {"query": query, "context": query})
            outcome = json.loads(body).get("outcome") if status == 200 else None
            return f"{query.split()[0]} {status} {outcome}"

        _loop(stop, tally, "fan-out bomb", once, 0.0)

    threads = [threading.Thread(target=bomber, args=(i,)) for i in range(bombs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def disconnecting_streamers(port: int, stop: threading.Event, tally: Counter[str]) -> None:
    """Streams whose episode starts two children (one calling the model in a loop, one
    sleeping), left once the children run."""
    def once() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/rlm", body=json.dumps({"query": "STRAND", "context": "STRAND", "stream": True}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return str(resp.status)
            line = b"-"
            while line and b'"start"' not in line:
                line = resp.readline()
            stop.wait(1.0)  # the root's cell and both children are running now
            return "left"
        except (OSError, http.client.HTTPException):
            return "cut"
        finally:
            conn.close()

    _loop(stop, tally, "streamer", once, 0.2)


def run_all(port: int, seconds: float, secret: str, slowloris_sockets: int = 1100, slow_bodies: int = 60,
            bombs: int = 3) -> Counter[str]:
    """Every attack at once for `seconds`; what they saw."""
    stop, tally = threading.Event(), Counter[str]()
    attacks: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (slowloris, (slowloris_sockets,)), (slowloris, (slow_bodies, True)), (huge_bodies, ()), (long_context_paths, ()), (foreign_host, (secret,)),
        (fanout_bombs, (bombs, 200, 1000)), (disconnecting_streamers, ()),
    ]
    threads = [threading.Thread(target=fn, args=(port, stop, tally, *args)) for fn, args in attacks]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    return tally


def main(argv: list[str] | None = None) -> None:
    """`python -m rlm_train.testing.gateway_attacks --port P --seconds S`: every attack at once, in
    a process of its own (so the attackers do not share a GIL with the clients measured); the
    tally is printed as one JSON line when done."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rlm_train.testing.gateway_attacks")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--secret", default="", help="text of a context file a foreign Host must never get back")
    ap.add_argument("--slowloris", type=int, default=1100, help="requests held open with half their headers sent")
    ap.add_argument("--slow-bodies", type=int, default=60, help="requests held open with their body trickling in")
    ap.add_argument("--bombs", type=int, default=3, help="clients sending fan-out bombs, one at a time each")
    args = ap.parse_args(argv)
    print(json.dumps(run_all(args.port, args.seconds, args.secret, args.slowloris, args.slow_bodies, args.bombs)),
          flush=True)


if __name__ == "__main__":
    main()
