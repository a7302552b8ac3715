"""A local OpenAI-compatible chat server for tests and benchmarks.

Real HTTP on 127.0.0.1, served by an asyncio loop in a background thread, so a
burst of 64+ concurrent requests costs no threads and no listen-backlog stall
(the stdlib `http.server` default backlog of 5 makes 32 concurrent connects
wait ~1 s for SYN retries). Endpoints: `POST /v1/chat/completions` (streamed as
server-sent events when the request asks, one word a token, `token_latency_s`
apart), `GET /v1/models`, `GET /health`, `GET /metrics` (vLLM's running/waiting
gauges). `max_model_len` answers 400 with vLLM's message when prompt + max_tokens
words do not fit the window.

    with MockOpenAIServer(latency_s=0.1) as srv:
        policy = OpenAIPolicy("mock", [srv.base_url])

Failure injection (`FailPlan`): 500s (or 429s) for the first N chat requests,
a seeded random fraction of requests that fail with 500 / hang / a dropped
connection / a garbage body, `stop()` / `start()` on the same port for "server
down, then back", and `freeze()` for a server that stops answering anything (its
/health too) while its port stays open. A responder can raise `MockHTTPError` to
answer e.g. a 400.

Manual use: `python -m rlm_train.testing.mock_server --port 8000 --latency-ms 100`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import random
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from rlm_train import eventloop
from rlm_train.models.http import REASONS, format_response, parse_request

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]


class MockHTTPError(Exception):
    """Raised by a responder to answer with an error status (e.g. 400 context too long)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FailPlan:
    """Which chat requests fail, and how. Only `POST /v1/chat/completions` counts."""

    first_n: int = 0  # the first N chat requests get `first_status`
    first_status: int = 500  # 500, 503 or 429 (with `retry_after_s`)
    retry_after_s: float | None = None  # sent as a Retry-After header on those failures
    p: float = 0.0  # later requests fail with this probability (seeded, reproducible)
    mode: str = "500"  # how a random failure looks: "500" | "hang" | "drop" | "garbage" | "mix" (all four)
    hang_s: float = 3600.0  # a "hang" holds the connection this long, then closes it unanswered
    seed: int = 0


def count_tokens(text: str) -> int:
    """Rough token count: whitespace-separated words. Good enough for usage checks."""
    return len(text.split())


def echo_responder(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """Deterministic default reply: echoes the start of the last user message."""
    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    if not isinstance(last, str):  # content parts list
        last = json.dumps(last)
    return "echo: " + last[:200]


class MockOpenAIServer:
    def __init__(
        self,
        responder: Responder | None = None,
        latency_s: float = 0.0,
        fail_plan: FailPlan | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        model: str = "mock-model",
        token_latency_s: float = 0.0,
        max_model_len: int | None = None,
    ):
        self.responder = responder or echo_responder
        self.latency_s = latency_s
        self.token_latency_s = token_latency_s  # between streamed tokens (words)
        self.max_model_len = max_model_len  # window in words: prompt + max_tokens beyond it get a 400
        self.frozen = False  # answer nothing at all (chat, /health, /metrics) while set
        self._streamed = False  # whether the request being answered asked for a stream
        self.fail_plan = fail_plan or FailPlan()
        self.host = host
        self.port = port  # 0 = pick a free port on first start; kept for later restarts
        self.model = model
        self.requests = 0  # chat requests received (including failed ones)
        self.counts: Counter[str] = Counter()  # outcome -> number: ok, error_500, hang, drop, ...
        self.connections = 0  # connections accepted (checks that clients keep them alive)
        self.in_flight = 0
        self.max_in_flight = 0  # peak concurrent chat requests seen (checks client concurrency bounds)
        self.bodies: deque[dict[str, Any]] = deque(maxlen=1000)  # last request bodies, for assertions
        self.headers: deque[dict[str, str]] = deque(maxlen=1000)  # their headers (lower-case names)
        self._rng = random.Random(self.fail_plan.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        return f"http://{host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._server is not None

    # ---- lifecycle (called from any thread) ----

    def start(self) -> "MockOpenAIServer":
        """Listen (again) on the same port. Safe to call from a timer thread."""
        if self._loop is None:
            self._loop = eventloop.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="mock-openai", daemon=True)
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: clients see the server as down."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(timeout=10)

    def freeze(self, frozen: bool = True) -> None:
        """Stop answering anything (like a process that is stopped or swapping): connections
        are still accepted, requests are read, and nothing comes back."""
        self.frozen = frozen

    def close(self) -> None:
        """Stop and end the background thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = None

    def __enter__(self) -> "MockOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def _open(self) -> None:
        if self._server is not None:
            return
        # reuse_address lets a restart bind the same port while old sockets sit in TIME_WAIT.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), self.host, self.port, backlog=1024, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shut(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.close()
        await self._server.wait_closed()
        self._server = None

    # ---- HTTP ----

    def _route(self, method: str, path: str, raw: bytes, headers: dict[str, str]):
        """What to do with one request: ("reply", status, payload, extra headers, delay s),
        ("stream", completion, delay s), ("hang", seconds), ("drop",) or ("garbage", delay s)."""
        if self.frozen:
            return "hang", 3600.0
        if path == "/health":
            return "reply", 200, {"status": "ok"}, {}, 0.0
        if path == "/metrics":  # vLLM's gauges, and what this server counted (ok, error_500, hang, ...)
            lines = [f'vllm:num_requests_running{{model_name="{self.model}"}} {self.in_flight}',
                     f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0']
            lines += [f'mock_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.counts.items())]
            return "metrics", "\n".join(lines) + "\n"
        if path == "/v1/models":
            return "reply", 200, {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "mock"}]}, {}, 0.0
        if path != "/v1/chat/completions":
            return ("reply", *_error(404, f"no route {path}"), 0.0)
        if method != "POST":
            return ("reply", *_error(405, "use POST"), 0.0)
        self.requests += 1
        index = self.requests - 1
        plan = self.fail_plan
        if index < plan.first_n:
            self.counts[f"error_{plan.first_status}"] += 1
            extra = {"Retry-After": f"{plan.retry_after_s:g}"} if plan.retry_after_s is not None else {}
            status, payload, _ = _error(plan.first_status, f"injected failure {index + 1}/{plan.first_n}")
            return "reply", status, payload, extra, self.latency_s
        if plan.p and self._rng.random() < plan.p:
            mode = self._rng.choice(["500", "hang", "drop", "garbage"]) if plan.mode == "mix" else plan.mode
            self.counts[mode if mode != "500" else "error_500"] += 1
            if mode == "hang":
                return "hang", self.latency_s + plan.hang_s
            if mode == "drop":
                return ("drop",)
            if mode == "garbage":
                return "garbage", self.latency_s
            return ("reply", *_error(500, "injected random failure"), self.latency_s)
        status, payload, extra, stream = self._chat(index, raw, headers)
        if stream and status == 200:
            return "stream", payload, self.latency_s
        return "reply", status, payload, extra, self.latency_s

    def _chat(self, index: int, raw: bytes, headers: dict[str, str]):
        self._streamed = False
        status, payload, extra = self._answer(index, raw, headers)
        return status, payload, extra, self._streamed

    def _answer(self, index: int, raw: bytes, headers: dict[str, str]):
        try:
            body = orjson.loads(raw or b"{}")
            messages = body["messages"]
            self._streamed = bool(body.get("stream"))
        except (ValueError, KeyError) as e:
            self.counts["bad_request"] += 1
            return _error(400, f"bad request body: {e}")
        self.bodies.append(body)
        self.headers.append(headers)
        max_tokens = body.get("max_tokens")
        prompt_tokens = sum(count_tokens(m.get("content") or "") for m in messages
                            if isinstance(m.get("content"), str))
        if self.max_model_len is not None and prompt_tokens + (max_tokens or 0) > self.max_model_len:
            self.counts["error_400"] += 1
            return _error(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                               f"requested {prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the "
                               f"messages, {max_tokens or 0} in the completion). Please reduce the length of the "
                               "messages or completion.")
        try:
            text = self.responder(messages, body)
        except MockHTTPError as e:
            self.counts[f"error_{e.status}"] += 1
            return _error(e.status, e.message)
        except Exception as e:  # a responder bug shows up as a 500 with its message
            self.counts["error_500"] += 1
            return _error(500, f"responder failed: {type(e).__name__}: {e}")

        finish = "stop"
        words = text.split()
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, words, finish = " ".join(words[:max_tokens]), words[:max_tokens], "length"
        self.counts["ok"] += 1
        return 200, {
            "id": f"chatcmpl-mock-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                      "total_tokens": prompt_tokens + len(words)},
        }, {}


class _Connection(asyncio.Protocol):
    """One client connection, requests answered in order. A protocol with timers rather
    than a task per connection on asyncio streams: the server shares the benchmark's two
    cores, and this way it costs a fraction of the CPU per request, so that it stands in
    for a remote server whose CPU is not ours (`rlm-train bench http` reports its CPU per
    request)."""

    def __init__(self, server: MockOpenAIServer):
        self.server = server
        self.transport: asyncio.Transport  # set by connection_made, before any other callback
        self.buffer = bytearray()
        self.pending: asyncio.TimerHandle | None = None  # the request being answered
        self.chat = False  # whether that request counts as in flight

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections += 1
        self.server._connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server._connections.discard(self)
        self._cancel_pending()

    def close(self) -> None:
        self._cancel_pending()
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _cancel_pending(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
            self._leave()

    def _leave(self) -> None:
        if self.chat:
            self.chat = False
            self.server.in_flight -= 1

    def _next_request(self) -> None:
        """Start on the next complete request in the buffer, unless one is being answered."""
        if self.pending is not None or self.transport.is_closing():
            return
        try:
            request = parse_request(self.buffer)
        except ValueError:
            self.transport.abort()
            return
        if request is None:
            return
        method, target, headers, raw, used = request
        del self.buffer[:used]
        path = target.split("?", 1)[0].rstrip("/")
        srv = self.server
        self.chat = path == "/v1/chat/completions" and method == "POST"
        if self.chat:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        action = srv._route(method, path, raw, headers)
        keep = headers.get("connection", "").lower() != "close"
        loop = asyncio.get_running_loop()
        if action[0] == "drop":  # injected: close without a response
            self._leave()
            self.transport.abort()
        elif action[0] == "hang":  # hold the connection, then close it unanswered
            self.pending = loop.call_later(action[1], self._hang_up)
        elif action[0] == "garbage":  # injected: a 200 whose body is not an answer
            self.pending = loop.call_later(action[1], self._respond_raw, b"\x00not json{", "application/json", keep)
        elif action[0] == "metrics":
            self.pending = loop.call_later(0.0, self._respond_raw, action[1].encode(), "text/plain", keep)
        elif action[0] == "stream":
            events = _stream_events(action[1])
            self.pending = loop.call_later(action[2], self._stream, events, 0, keep)
        else:
            _, status, payload, extra, delay = action
            self.pending = loop.call_later(delay, self._respond, status, payload, extra, keep)

    def _respond_raw(self, body: bytes, content_type: str, keep: bool) -> None:
        self.pending = None
        self._leave()
        self.transport.write(format_response(200, body, {"Content-Type": content_type}))
        self._after_response(keep)

    def _stream(self, events: list[bytes], start: int, keep: bool) -> None:
        """Send a streamed answer: all at once, or one token every token_latency_s."""
        gap = self.server.token_latency_s
        if start == 0:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
        end = start + 1 if gap else len(events)
        body = b"".join(events[start:end])
        self.transport.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
        if end < len(events):
            self.pending = asyncio.get_running_loop().call_later(gap, self._stream, events, end, keep)
            return
        self.pending = None
        self._leave()
        self.transport.write(b"0\r\n\r\n")
        self._after_response(keep)

    def _after_response(self, keep: bool) -> None:
        if keep:
            self._next_request()
        else:
            self.transport.close()

    def _hang_up(self) -> None:
        self.pending = None
        self._leave()
        self.transport.abort()

    def _respond(self, status: int, payload: dict[str, Any], extra: dict[str, str], keep: bool) -> None:
        self.pending = None
        self._leave()
        self.transport.write(format_response(status, orjson.dumps(payload),
                                             {"Content-Type": "application/json", **extra}))
        if keep:
            self._next_request()
        else:
            self.transport.close()


def _stream_events(completion: dict[str, Any]) -> list[bytes]:
    """A chat completion as vLLM streams it: a role delta, one delta per word (spacing kept),
    the finish reason, the usage, [DONE]."""
    choice = completion["choices"][0]
    head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **more}) + b"\n\n"

    pieces = re.findall(r"\s*\S+\s*", choice["message"]["content"]) or [""]
    events = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    events += [event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]) for piece in pieces]
    events.append(event([{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]))
    events.append(event([], usage=completion["usage"]))
    events.append(b"data: [DONE]\n\n")
    return events


def _error(status: int, message: str):
    # vLLM's error shape: {"error": {"message", "type", "code"}}.
    return status, {"error": {"message": message, "type": REASONS.get(status, "Error"), "code": status}}, {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rlm_train.testing.mock_server",
                                 description="Local OpenAI-compatible mock chat server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay before every chat answer")
    ap.add_argument("--token-latency-ms", type=float, default=0.0, help="delay between streamed tokens")
    ap.add_argument("--fail-first", type=int, default=0, help="answer 500 to the first N chat requests")
    ap.add_argument("--fail-p", type=float, default=0.0, help="fraction of later requests that fail")
    ap.add_argument("--fail-mode", default="500", choices=["500", "hang", "drop", "garbage", "mix"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--responder", help="MODULE:NAME of a responder(messages, body) -> str (default: echo)")
    args = ap.parse_args(argv)
    responder = None
    if args.responder:
        module_name, _, attr = args.responder.partition(":")
        responder = getattr(importlib.import_module(module_name), attr)
    plan = FailPlan(first_n=args.fail_first, p=args.fail_p, mode=args.fail_mode, seed=args.seed)
    srv = MockOpenAIServer(responder=responder, latency_s=args.latency_ms / 1000,
                           token_latency_s=args.token_latency_ms / 1000, fail_plan=plan, port=args.port, host=args.host)
    with srv:
        print(f"mock OpenAI server on {srv.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@contextlib.contextmanager
def mock_server_process(responder: str | None = None, latency_ms: float = 0.0, timeout_s: float = 30.0,
                        token_latency_ms: float = 0.0):
    """Run the mock server in its own process (yields its base URL).

    Benchmarks use this so the server's request handling does not share the
    measured process's CPU and GIL.
    """
    cmd = [sys.executable, "-m", "rlm_train.testing.mock_server", "--port", "0", "--latency-ms", str(latency_ms),
           "--token-latency-ms", str(token_latency_ms)]
    if responder:
        cmd += ["--responder", responder]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        out = proc.stdout
        assert out is not None  # stdout=PIPE
        ready = select.select([out], [], [], timeout_s)[0]
        line = out.readline() if ready else ""
        match = re.search(r"(http://\S+/v1)", line)
        if not match:
            raise RuntimeError(f"mock server process did not start: {line!r}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()

