"""Async client for OpenAI-compatible chat servers (vLLM first of all).

One `OpenAIPolicy` spreads requests over one or more servers (`--base-url`,
repeatable): each request goes to the healthy server with the fewest requests
in flight, a server that just failed is avoided for a while, and a retry moves
to another server when there is one. Transient failures (connection errors,
timeouts, 429, 5xx) are retried with exponential backoff and full jitter,
honoring Retry-After; other 4xx (context too long, unknown model) fail at once
with the server's own message.

The HTTP/1.1 transport is `rlm_train.models.http` (why not httpx or aiohttp: there).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from rlm_train.models.base import Completion, Message, PolicyError, SamplingParams
from rlm_train.models.http import Endpoint

# Besides 5xx: rate limiting and request-timeout statuses are worth retrying.
_RETRY_STATUSES = {408, 409, 425, 429}


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Server:
    """One base URL: its connections and its health."""

    url: str  # base URL without trailing slash, e.g. http://127.0.0.1:8000/v1
    endpoint: Endpoint = field(init=False)
    chat_path: str = field(init=False)
    in_flight: int = 0
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
        self._servers = [_Server(u.rstrip("/")) for u in base_urls]
        self._rr = 0  # round-robin cursor to break least-in-flight ties
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sent with every request; holds the API key, so never logged or repr'd.
        self._headers = (f"Authorization: Bearer {api_key or 'EMPTY'}\r\n"
                         "Content-Type: application/json\r\nAccept: application/json\r\n")
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0}

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
        hints: dict[str, Any] | None = None,  # side information for scripted policies; never sent
    ) -> Completion:
        sem = self._bind_loop()
        payload = orjson.dumps(self._body(messages, sampling))
        self.stats["requests"] += 1
        last: _Server | None = None
        last_error = ""
        tried: list[str] = []
        for attempt in range(self.max_retries + 1):
            try:
                # Pick after getting a slot, so the choice reflects the servers' state now.
                async with sem:
                    server = last = self._pick(avoid=last)
                    if server.url not in tried:
                        tried.append(server.url)
                    completion = await self._attempt(server, payload)
            except _Retryable as e:
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
            completion.retries = attempt
            self.stats["prompt_tokens"] += completion.prompt_tokens
            self.stats["completion_tokens"] += completion.completion_tokens
            return completion
        self.stats["failures"] += 1
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
        body.update(self.extra_body)
        return body

    async def _attempt(self, server: _Server, payload: bytes) -> Completion:
        """One HTTP request. Raises _Retryable for transient trouble, PolicyError for a final no."""
        url = server.url + "/chat/completions"
        server.in_flight += 1
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                resp = await server.endpoint.request("POST", server.chat_path, payload, self._headers)
        except TimeoutError as e:
            raise _Retryable(f"no answer within {self.request_timeout_s:g}s from {url} (timeout)") from e
        except (OSError, EOFError, ValueError) as e:
            # OSError covers refused/reset connections; EOF/ValueError a cut or garbled response.
            raise _Retryable(f"{type(e).__name__} from {url}: {str(e) or 'connection closed'}") from e
        finally:
            server.in_flight -= 1
        latency = time.perf_counter() - t0

        if resp.status != 200:
            message = f"HTTP {resp.status} from {url}: {_error_message(resp.body)}"
            if resp.status >= 500 or resp.status in _RETRY_STATUSES:
                raise _Retryable(message, _retry_after(resp.headers.get("retry-after")))
            raise PolicyError(f"{self.name}: {message}")
        try:
            data = orjson.loads(resp.body)
            choice = data["choices"][0]
            message_obj = choice["message"]
            text = message_obj.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            # A 200 without a chat answer is a server or proxy bug worth one more try.
            raise _Retryable(f"malformed response from {url}: {resp.body[:200]!r}") from e
        usage = data.get("usage") or {}
        extra: dict[str, Any] = {"server": server.url}
        if message_obj.get("reasoning_content"):  # vLLM reasoning parsers put thinking here
            extra["reasoning_content"] = message_obj["reasoning_content"]
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
            finish_reason=choice.get("finish_reason"),
            extra=extra,
        )

    # ---- servers: choice and health ----

    def _bind_loop(self) -> asyncio.Semaphore:
        """The semaphore of the running loop. Streams and the semaphore belong to one event
        loop; a new loop (e.g. a second asyncio.run) starts with fresh ones instead of failing."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._sem is None:
            self._loop = loop
            self._sem = asyncio.Semaphore(self.max_concurrency)
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

    def _mark_failed(self, server: _Server) -> None:
        server.fails += 1
        server.avoid_until = time.monotonic() + min(
            self.backoff_max_s, self.backoff_base_s * 2 ** (server.fails - 1))

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
