"""Async client for OpenAI-compatible chat servers (vLLM first of all).

One `OpenAIPolicy` spreads requests over one or more servers (`--base-url`,
repeatable): each request goes to the healthy server with the fewest requests
in flight, a server that just failed is avoided for a while, and a retry moves
to another server when there is one. Transient failures (connection errors,
429, 5xx, garbled answers) are retried with exponential backoff and full jitter,
honoring Retry-After; other 4xx (context too long, unknown model) fail at once
with the server's own message: only that request fails.

A slow server is not a dead one. Answers are streamed, so each token that arrives
keeps the request alive: `request_timeout_s` is the longest silence allowed, not
the longest answer. After such a silence the server's /health is asked: a server
that answers it is busy, and the request is repeated only with something changed
(twice the timeout, half as many requests in flight), with a warning saying so; a
server whose /health is silent too stopped answering, and the request fails at once
(or moves to another server) with that diagnosis instead of being retried for minutes.

The HTTP/1.1 transport is `rlm_train.models.http` (why a protocol of our own, not asyncio
streams or aiohttp: there, and `rlm-train bench http`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from rlm_train.models.base import CallContext, Completion, Message, PolicyError, RequestRefused, SamplingParams
from rlm_train.models.http import Endpoint

log = logging.getLogger(__name__)

# Besides 5xx: rate limiting and request-timeout statuses are worth retrying.
_RETRY_STATUSES = {408, 409, 425, 429}
# The request itself was refused (too long, malformed): the server is fine, this one request is not.
_REFUSED_STATUSES = {400, 413, 422}
MAX_TIMEOUT_S = 3600.0  # a busy server's timeout doubles up to this


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Silent(Exception):
    """No byte from the server for the whole timeout: busy or dead, /health tells which."""


class _Limiter:
    """A semaphore whose limit can be lowered while requests are in flight (a busy server)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.cond = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc: Any) -> None:
        async with self.cond:
            self.active -= 1
            self.cond.notify()

    def recover(self, ceiling: int) -> None:
        """One answer more: one request more in flight, up to the ceiling (after a slow-down,
        the limit comes back one answer at a time)."""
        if self.limit < ceiling:
            self.limit += 1


@dataclass
class _Server:
    """One base URL: its connections and its health."""

    url: str  # base URL without trailing slash, e.g. http://127.0.0.1:8000/v1
    endpoint: Endpoint = field(init=False)
    chat_path: str = field(init=False)
    in_flight: int = 0
    last_ok: float = 0.0  # monotonic time of its last answer
    fails: int = 0  # consecutive failures; reset by a success
    avoid_until: float = 0.0  # monotonic time before which other servers are preferred

    def __post_init__(self) -> None:
        try:
            self.endpoint = Endpoint(self.url)
        except ValueError:
            raise ValueError(f"base URL {self.url!r} must look like http://HOST:PORT/v1") from None
        self.chat_path = self.endpoint.path + "/chat/completions"


class OpenAIPolicy:
    def __init__(
        self,
        model: str,
        base_urls: list[str],
        api_key: str | None = None,
        request_timeout_s: float = 120,
        max_retries: int = 5,
        max_concurrency: int = 64,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20,
        name: str | None = None,
        extra_body: dict[str, Any] | None = None,
        stream: bool = True,
        health_timeout_s: float = 10.0,
    ):
        if not base_urls:
            raise ValueError("OpenAIPolicy needs at least one base URL, e.g. http://127.0.0.1:8000/v1")
        self.model = model
        self.name = name or f"openai:{model}"
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.extra_body = dict(extra_body or {})
        self.stream = stream
        self.health_timeout_s = health_timeout_s
        self._servers = [_Server(u.rstrip("/")) for u in base_urls]
        self._rr = 0  # round-robin cursor to break least-in-flight ties
        self._sem: _Limiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_busy: set[str] = set()
        # Sent with every request; holds the API key, so never logged or repr'd.
        self._headers = (f"Authorization: Bearer {api_key or 'EMPTY'}\r\n"
                         "Content-Type: application/json\r\nAccept: application/json\r\n")
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0,
                                      "streamed_tokens": 0,  # stream events received, live (progress)
                                      "busy_timeouts": 0}

    def __repr__(self) -> str:
        return f"OpenAIPolicy(model={self.model!r}, base_urls={self.base_urls!r})"

    @property
    def base_urls(self) -> list[str]:
        return [s.url for s in self._servers]

    # ---- the call ----

    async def chat(
        self,
        messages: list[Message],
        sampling: SamplingParams | None = None,
        call: CallContext | None = None,  # where the call comes from: never sent
    ) -> Completion:
        limiter = self._bind_loop()
        payload = orjson.dumps(self._body(messages, sampling))
        self.stats["requests"] += 1
        last: _Server | None = None
        last_error = ""
        tried: list[str] = []
        timeout = self.request_timeout_s
        busy = False  # the last failure was a live server too busy to answer in time
        silent = 0  # attempts of this request that heard nothing
        for attempt in range(self.max_retries + 1):
            sent = time.monotonic()
            try:
                # Pick after getting a slot, so the choice reflects the servers' state now.
                async with limiter:
                    server = last = self._pick(avoid=last)
                    if server.url not in tried:
                        tried.append(server.url)
                    completion = await self._attempt(server, payload, timeout)
            except _Silent:
                silent += 1
                diagnosis, waiting = await self._diagnose(server)
                if diagnosis is None:  # /health is silent too: the server stopped answering
                    last_error = (f"{server.url} stopped answering: no byte for {timeout:g}s and its /health "
                                  f"gave no answer within {self.health_timeout_s:g}s either")
                    self._mark_failed(server, dead=True)
                    if attempt < self.max_retries and self._has_healthy_alternative(server):
                        self.stats["retries"] += 1
                        continue
                    self.stats["failures"] += 1
                    raise PolicyError(f"{self.name}: {last_error}. Is the server process still running (not "
                                      "stopped, swapping or out of memory)? Restart it and re-run the same "
                                      "command to resume.") from None
                if attempt == self.max_retries:
                    busy, last_error = True, f"{server.url} is up ({diagnosis}) but sent no byte for {timeout:g}s"
                    self.stats["busy_timeouts"] += 1
                    break
                self.stats["retries"] += 1
                if silent == 1 and server.last_ok > sent and not waiting:
                    # It answered other requests meanwhile and queues none: this one was lost. Once.
                    busy, last_error = False, f"{server.url} answered others but not this request for {timeout:g}s"
                    continue
                # Busy: never repeat the same request the same way.
                busy, last_error = True, f"{server.url} is up ({diagnosis}) but sent no byte for {timeout:g}s"
                self.stats["busy_timeouts"] += 1
                timeout = min(timeout * 2, MAX_TIMEOUT_S)
                limit = self._slow_down()
                self._warn_busy(server, last_error, timeout, limit)
                continue
            except _Retryable as e:
                busy = False
                last_error = str(e)
                self._mark_failed(server)
                if attempt == self.max_retries:
                    break
                self.stats["retries"] += 1
                # Another healthy server: fail over at once. Otherwise wait before hammering.
                if e.retry_after is not None or not self._has_healthy_alternative(server):
                    await asyncio.sleep(self._backoff(attempt, e.retry_after))
                continue
            except PolicyError:
                self.stats["failures"] += 1
                raise
            server.fails = 0
            server.avoid_until = 0.0
            server.last_ok = time.monotonic()
            limiter.recover(self.max_concurrency)
            completion.retries = attempt
            self.stats["prompt_tokens"] += completion.prompt_tokens
            self.stats["completion_tokens"] += completion.completion_tokens
            return completion
        self.stats["failures"] += 1
        if busy:
            raise PolicyError(
                f"{self.name}: no answer after {self.max_retries + 1} attempts, the last with a {timeout:g}s timeout: "
                f"{last_error}. The server is busy, not down: raise --request-timeout-s (e.g. "
                f"{min(timeout * 2, MAX_TIMEOUT_S):g}) or lower --concurrency / --max-concurrency.")
        raise PolicyError(
            f"{self.name}: no answer after {self.max_retries + 1} attempts to {', '.join(tried)}; "
            f"last error: {last_error}. Is the server running and serving model {self.model!r}? "
            f"Check --base-url (e.g. http://HOST:PORT/v1) and `curl {tried[-1]}/models`.")

    async def aclose(self) -> None:
        for server in self._servers:
            server.endpoint.close()

    def _body(self, messages: list[Message], sampling: SamplingParams | None) -> dict[str, Any]:
        s = sampling or SamplingParams()
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
        if s.stop:
            body["stop"] = s.stop
        if s.seed is not None:
            body["seed"] = s.seed
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        return body

    async def _attempt(self, server: _Server, payload: bytes, timeout: float) -> Completion:
        """One HTTP request. Raises _Retryable for transient trouble, _Silent after `timeout`
        seconds without a byte, PolicyError for a final no."""
        url = server.url + "/chat/completions"
        server.in_flight += 1
        t0 = time.perf_counter()
        heard = [time.monotonic()]
        stats = self.stats

        def on_data(data: bytes) -> None:
            heard[0] = time.monotonic()
            stats["streamed_tokens"] += data.count(b"data:")

        request = asyncio.ensure_future(server.endpoint.request("POST", server.chat_path, payload, self._headers,
                                                                on_data=on_data))
        try:
            while True:  # wait while bytes keep arriving; give up after `timeout` s of silence
                left = heard[0] + timeout - time.monotonic()
                if left <= 0:
                    raise _Silent()
                done, _ = await asyncio.wait({request}, timeout=left)
                if done:
                    break
            resp = request.result()
        except (OSError, EOFError, ValueError) as e:
            # OSError covers refused/reset connections; EOF/ValueError a cut or garbled response.
            raise _Retryable(f"{type(e).__name__} from {url}: {str(e) or 'connection closed'}") from e
        finally:
            server.in_flight -= 1
            if not request.done():
                request.cancel()  # its connection is closed, not reused
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await request
        latency = time.perf_counter() - t0

        if resp.status != 200:
            message = f"HTTP {resp.status} from {url}: {_error_message(resp.body)}"
            if resp.status >= 500 or resp.status in _RETRY_STATUSES:
                raise _Retryable(message, _retry_after(resp.headers.get("retry-after")))
            if resp.status in _REFUSED_STATUSES:
                raise RequestRefused(f"{self.name}: {message}")
            raise PolicyError(f"{self.name}: {message}")
        try:
            if "text/event-stream" in resp.headers.get("content-type", ""):
                text, finish, usage, reasoning = _parse_stream(resp.body)
            else:
                data = orjson.loads(resp.body)
                choice = data["choices"][0]
                message_obj = choice["message"]
                text, finish = message_obj.get("content") or "", choice.get("finish_reason")
                usage, reasoning = data.get("usage") or {}, message_obj.get("reasoning_content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            # A 200 without a chat answer is a server or proxy bug worth one more try.
            raise _Retryable(f"malformed response from {url}: {resp.body[:200]!r}") from e
        extra: dict[str, Any] = {"server": server.url}
        if reasoning:  # vLLM reasoning parsers put thinking here
            extra["reasoning_content"] = reasoning
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
            finish_reason=finish,
            extra=extra,
        )

    async def _diagnose(self, server: _Server) -> tuple[str | None, float]:
        """After a silent request: (None, 0) when the server's /health does not answer either
        (dead, stopped or swapping), else what it says about its load, and the requests it
        has waiting (vLLM's /metrics; 0 when unknown)."""
        origin = Endpoint(server.url)  # a connection of its own: the pooled ones may be stuck
        try:
            async with asyncio.timeout(self.health_timeout_s):
                health = await origin.request("GET", "/health", b"", "Connection: close\r\n")
        except (TimeoutError, OSError, EOFError, ValueError):
            return None, 0.0
        finally:
            origin.close()
        note = f"/health answered {health.status}"
        load, waiting = await _vllm_load(server, min(self.health_timeout_s, 5.0))
        return (f"{note}; {load}" if load else note), waiting

    def _slow_down(self) -> int:
        """Halve the requests in flight (at least 1): a busy server answers fewer requests sooner."""
        limiter = self._sem
        assert limiter is not None  # chat() bound it
        in_use = min(limiter.limit, limiter.active + 1)  # this request has left its slot
        limiter.limit = max(1, in_use // 2)
        return limiter.limit

    def _warn_busy(self, server: _Server, what: str, timeout: float, limit: int) -> None:
        first = server.url not in self._warned_busy
        self._warned_busy.add(server.url)
        if first or timeout >= MAX_TIMEOUT_S:
            log.warning("%s: %s; the server is busy, not down: retrying with a %gs timeout and at most %d "
                        "requests in flight. Next time raise --request-timeout-s or lower --concurrency.",
                        self.name, what, timeout, limit)

    # ---- servers: choice and health ----

    def _bind_loop(self) -> _Limiter:
        """The limiter of the running loop. Connections and the limiter belong to one event
        loop; a new loop (e.g. a second asyncio.run) starts with fresh ones instead of failing."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._sem is None:
            self._loop = loop
            self._sem = _Limiter(self.max_concurrency)
            for server in self._servers:
                server.endpoint.forget()  # their transports died with the old loop
        return self._sem

    def _pick(self, avoid: _Server | None) -> _Server:
        """Least in flight among servers not recently failed; the one just tried only if nothing else."""
        now = time.monotonic()
        candidates = [s for s in self._servers if s is not avoid] or self._servers
        healthy = [s for s in candidates if s.avoid_until <= now]
        if not healthy:  # all failed recently: take whichever comes back first
            return min(candidates, key=lambda s: s.avoid_until)
        if len(healthy) == 1:
            return healthy[0]
        self._rr += 1
        n = len(healthy)
        return min((healthy[(self._rr + i) % n] for i in range(n)), key=lambda s: s.in_flight)

    def _has_healthy_alternative(self, server: _Server) -> bool:
        now = time.monotonic()
        return any(s is not server and s.avoid_until <= now for s in self._servers)

    def _mark_failed(self, server: _Server, dead: bool = False) -> None:
        server.fails += 1
        avoid = min(self.backoff_max_s, self.backoff_base_s * 2 ** (server.fails - 1))
        server.avoid_until = time.monotonic() + (max(avoid, 60.0) if dead else avoid)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        # Full jitter spreads the retries of many concurrent callers instead of syncing them.
        delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay


def _error_message(body: bytes) -> str:
    """The server's own error text: vLLM/OpenAI put it at error.message (older vLLM: message)."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace").replace("\n", " ").strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str) and data[key]:
                return data[key]
    return str(data)[:500]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # the HTTP-date form is rare from inference servers; plain backoff then


def _parse_stream(body: bytes) -> tuple[str, str | None, dict[str, Any], str | None]:
    """A streamed chat answer (server-sent events): its text, finish reason, usage and reasoning."""
    text: list[str] = []
    reasoning: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] = {}
    done = False
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = orjson.loads(data)
        if event.get("error"):  # an error after the stream began
            raise ValueError(f"error in the stream: {event['error']}")
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            finish = choice.get("finish_reason") or finish
        usage = event.get("usage") or usage
    if not done:
        raise ValueError("the stream ended without [DONE]")
    return "".join(text), finish, usage, "".join(reasoning) or None


_GAUGE_RE = re.compile(rb"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})?\s+([0-9.eE+]+)", re.MULTILINE)


async def _vllm_load(server: _Server, timeout: float) -> tuple[str | None, float]:
    """vLLM's own count of requests running and waiting (its Prometheus /metrics), when it has one."""
    origin = Endpoint(server.url)
    try:
        async with asyncio.timeout(timeout):
            resp = await origin.request("GET", "/metrics", b"", "Connection: close\r\n")
    except (TimeoutError, OSError, EOFError, ValueError):
        return None, 0.0
    finally:
        origin.close()
    if resp.status != 200:
        return None, 0.0
    counts: dict[str, float] = {}
    for kind, value in _GAUGE_RE.findall(resp.body):
        counts[kind.decode()] = counts.get(kind.decode(), 0.0) + float(value)
    if not counts:
        return None, 0.0
    return f"{counts.get('running', 0):g} requests running, {counts.get('waiting', 0):g} waiting", counts.get("waiting", 0.0)
