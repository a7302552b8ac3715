"""The RLM gateway: RLM episodes behind HTTP, in front of any OpenAI-compatible server.

    app = create_app(GatewayConfig(base_urls=["http://127.0.0.1:8000/v1"], models=["gemma3-270m"]))
    with GatewayThread(app, "127.0.0.1", 0) as gw:      # uvicorn in a thread; gw.url
        ...

Endpoints (JSON in and out; errors are `{"error": {"message", "type", "code"}}`):

- `POST /v1/rlm`: `{"query", "context" | "context_path", "model"?, "sub_model"?, "budget"?,
  "stream"?, "include_trajectory"?}` -> `{"id", "model", "answer", "outcome", "error",
  "usage", "budget", "trajectory"}`. An episode that ran answers 200 whatever its outcome
  (`final`, `max_iterations`, `budget_exhausted`, `error`); with `"stream": true` the body is
  NDJSON: `{"event": "queued"}`, `{"event": "start"}`, one `{"event": "turn", "turn": ...}`
  per root turn, `{"event": "ping"}` while quiet, and `{"event": "result", ...}` last.
- `POST /v1/chat/completions`: OpenAI's chat completion (and its SSE stream). The last user
  message is split at its last blank line: the text before it is the episode's `context`, the
  text after it the query ("document, then question"); without a blank line the whole message
  is both. System messages are put before the query. `"rlm": {"context" | "context_path",
  "budget", "sub_model", "include_trajectory"}` in the body (the openai client's `extra_body`)
  gives the context explicitly; the whole last user message is then the query. The response
  is a `chat.completion` whose content is the answer, plus an `rlm` object (outcome, turns, ...).
- `GET /v1/models`, `GET /health` (no auth), `GET /metrics` (Prometheus text).

Limits: episodes run `max_concurrent` at a time with `max_queue` waiting, beyond that 429
with Retry-After (nothing is started, so nothing is lost); bodies over `max_body_bytes` get
413; malformed bodies 422; a `context_path` outside the allowed directories 403; a missing
or wrong bearer token 401 (when `token_env` is set). A request's budget may lower the
server's `rlm` settings, never raise them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlm_train.errors import UserError
from rlm_train.models.base import Policy
from rlm_train.records import EpisodeRecord, Outcome, TrajectoryRecord, TurnRecord
from rlm_train.rlm import RLMConfig, run_episode
from rlm_train.serve.config import GatewayConfig

# Request budgets capped by the server's RLMConfig (a request may lower them, never raise them).
CAPPED_FIELDS = ("max_iterations", "max_depth", "max_subcalls", "max_tokens", "max_wall_s",
                 "root_max_tokens", "sub_max_tokens")
QUESTION_MAX_CHARS = 4000  # a last paragraph longer than this is not a question: the whole message is context
DEFAULT_QUERY = "Answer the request in the context."
_ENDPOINTS = ("/v1/rlm", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_EPISODE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600)


# ---------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestBudget(_Body):
    """Per-request limits; each is capped by the server's `rlm` setting of the same name."""

    max_iterations: int | None = Field(None, ge=1)
    max_depth: int | None = Field(None, ge=0)
    max_subcalls: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_wall_s: float | None = Field(None, gt=0)
    root_max_tokens: int | None = Field(None, ge=1)
    sub_max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class RLMRequest(_Body):
    query: str = Field(min_length=1)
    context: str | list[Any] | dict[str, Any] | None = None
    context_path: str | None = Field(None, min_length=1)
    model: str | None = None
    sub_model: str | None = None
    budget: RequestBudget | None = None
    stream: bool = False
    include_trajectory: bool = True

    @model_validator(mode="after")
    def _one_context(self) -> "RLMRequest":
        if (self.context is None) == (self.context_path is None):
            raise ValueError("pass exactly one of `context` (inline) and `context_path` (a file in an allowed directory)")
        return self


class RLMExtension(_Body):
    """`rlm` in a chat completion body: the context given explicitly, budgets, and what to return."""

    context: str | list[Any] | dict[str, Any] | None = None
    context_path: str | None = Field(None, min_length=1)
    sub_model: str | None = None
    budget: RequestBudget | None = None
    include_trajectory: bool = False

    @model_validator(mode="after")
    def _at_most_one_context(self) -> "RLMExtension":
        if self.context is not None and self.context_path is not None:
            raise ValueError("pass at most one of rlm.context and rlm.context_path")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI sampling fields (top_p, seed, ...) are accepted and not used
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = Field(1, ge=1, le=1)
    rlm: RLMExtension | None = None


# ---------------------------------------------------------------------------
# Errors


class GatewayError(HTTPException):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind = kind


def _error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
            loc = "body"
        parts.append(f"{loc}: {msg}")
    return "invalid request: " + "; ".join(parts)


# ---------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.rejected: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.turns = 0
        self.sub_calls = 0
        self.started = 0
        self.peak_running = 0
        self.buckets = [0] * (len(_EPISODE_BUCKETS) + 1)
        self.seconds_sum = 0.0

    def episode(self, record: TrajectoryRecord, seconds: float) -> None:
        usage = tree_usage(record)
        self.outcomes[str(record["outcome"])] += 1
        self.tokens["prompt"] += usage["prompt_tokens"]
        self.tokens["completion"] += usage["completion_tokens"]
        self.turns += record["stats"]["turns"]
        self.sub_calls += record["stats"]["sub_calls"]
        self.seconds_sum += seconds
        for i, bound in enumerate(_EPISODE_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.buckets[-1] += 1

    def render(self, running: int, queued: int, config: GatewayConfig) -> str:
        lines = [
            "# HELP rlm_gateway_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE rlm_gateway_requests_total counter",
            *(f'rlm_gateway_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())),
            "# HELP rlm_gateway_rejected_total Requests refused before an episode started, by reason.",
            "# TYPE rlm_gateway_rejected_total counter",
            *(f'rlm_gateway_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())),
            "# HELP rlm_gateway_episodes_started_total Episodes started.",
            "# TYPE rlm_gateway_episodes_started_total counter",
            f"rlm_gateway_episodes_started_total {self.started}",
            "# HELP rlm_gateway_episodes_total Episodes finished, by outcome.",
            "# TYPE rlm_gateway_episodes_total counter",
            *(f'rlm_gateway_episodes_total{{outcome="{o}"}} {n}' for o, n in sorted(self.outcomes.items())),
            "# HELP rlm_gateway_episodes_running Episodes running now.",
            "# TYPE rlm_gateway_episodes_running gauge",
            f"rlm_gateway_episodes_running {running}",
            "# HELP rlm_gateway_episodes_running_max Most episodes running at once so far.",
            "# TYPE rlm_gateway_episodes_running_max gauge",
            f"rlm_gateway_episodes_running_max {self.peak_running}",
            "# HELP rlm_gateway_episodes_queued Episodes waiting for a slot now.",
            "# TYPE rlm_gateway_episodes_queued gauge",
            f"rlm_gateway_episodes_queued {queued}",
            "# HELP rlm_gateway_max_concurrent Episodes allowed to run at once.",
            "# TYPE rlm_gateway_max_concurrent gauge",
            f"rlm_gateway_max_concurrent {config.max_concurrent}",
            "# HELP rlm_gateway_max_queue Episodes allowed to wait.",
            "# TYPE rlm_gateway_max_queue gauge",
            f"rlm_gateway_max_queue {config.max_queue}",
            "# HELP rlm_gateway_tokens_total Model tokens used by finished episodes (whole call tree).",
            "# TYPE rlm_gateway_tokens_total counter",
            *(f'rlm_gateway_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())),
            "# HELP rlm_gateway_turns_total Root turns of finished episodes.",
            "# TYPE rlm_gateway_turns_total counter",
            f"rlm_gateway_turns_total {self.turns}",
            "# HELP rlm_gateway_sub_calls_total Sub-calls of finished episodes.",
            "# TYPE rlm_gateway_sub_calls_total counter",
            f"rlm_gateway_sub_calls_total {self.sub_calls}",
            "# HELP rlm_gateway_episode_seconds Wall time of finished episodes, queueing excluded.",
            "# TYPE rlm_gateway_episode_seconds histogram",
            *(f'rlm_gateway_episode_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(_EPISODE_BUCKETS, self.buckets)),
            f'rlm_gateway_episode_seconds_bucket{{le="+Inf"}} {self.buckets[-1]}',
            f"rlm_gateway_episode_seconds_sum {self.seconds_sum:.4f}",
            f"rlm_gateway_episode_seconds_count {self.buckets[-1]}",
        ]
        return "\n".join(lines) + "\n"


def tree_usage(episode: EpisodeRecord) -> dict[str, int]:
    """Prompt and completion tokens of an episode's whole call tree (root turns, sub-calls, children)."""
    prompt = completion = 0
    for turn in episode["turns"]:
        prompt += turn["prompt_tokens"]
        completion += turn["completion_tokens"]
        for call in turn["sub_calls"]:
            prompt += call["prompt_tokens"]
            completion += call["completion_tokens"]
            if "child" in call:
                child = tree_usage(call["child"])
                prompt += child["prompt_tokens"]
                completion += child["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------
# The gateway's state


class _Edge:
    """Outermost ASGI layer: the body size limit (Content-Length, and counted while read, for
    chunked bodies) and the per-endpoint status counts."""

    def __init__(self, app: Any, gateway: "Gateway"):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        limit = self.gateway.config.max_body_bytes
        status_seen: list[int] = []

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                self.gateway.metrics.requests[(endpoint, message["status"])] += 1
            await send(message)

        headers = dict(scope.get("headers") or [])
        if path != "/health":
            refusal = self.gateway.auth_refusal(headers.get(b"authorization", b"").decode("latin-1"))
            if refusal is not None:  # before the body is read
                await _send_error(counting_send, 401, refusal, "authentication_error",
                                  [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.gateway.metrics.rejected["too_large"] += 1
            await _send_error(counting_send, 413, _too_large(limit), "request_too_large")
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    self.gateway.metrics.rejected["too_large"] += 1
                    raise GatewayError(413, _too_large(limit), "request_too_large")
            return message

        await self.app(scope, limited_receive, counting_send)


def _too_large(limit: int) -> str:
    return (f"request body larger than the gateway's limit of {limit:,} bytes; send a big context as a file "
            "(context_path, in a directory the gateway allows) or raise gateway.max_body_bytes")


async def _send_error(send: Any, status: int, message: str, kind: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_body(status, message, kind)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """Policies, admission (running + queued), budgets, context files and metrics of one app."""

    def __init__(self, config: GatewayConfig):
        if not config.base_urls:
            raise UserError("the gateway needs an upstream server: pass --base-url http://HOST:PORT/v1 (or --model)")
        if not config.models:
            raise UserError("the gateway needs the upstream model names: pass --gateway-model NAME")
        self.config = config
        self.metrics = Metrics()
        self.running = 0
        self.queued = 0
        self._slots: asyncio.Semaphore | None = None
        self._policies: dict[str, Policy] = {}
        self.token = self._read_token(config.token_env)
        self.context_dirs = [Path(d).expanduser().resolve() for d in config.context_dirs]
        for d in self.context_dirs:
            if not d.is_dir():
                raise UserError(f"--context-dir {d}: not a directory")
        for name in dict.fromkeys([*config.models, *([config.sub_model] if config.sub_model else [])]):
            self.policy(name)  # bad base URLs fail here, at start-up

    @staticmethod
    def _read_token(env: str | None) -> str | None:
        if not env:
            return None
        token = os.environ.get(env, "").strip()
        if not token:
            raise UserError(f"--token-env {env}: the environment variable {env} is not set or empty; "
                            "set it to the bearer token clients must send")
        return token

    # -- auth, models, budgets, contexts --------------------------------------------------

    def auth_refusal(self, header: str) -> str | None:
        """Why a request with this Authorization header is refused (None: let it in)."""
        if self.token is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return None
        self.metrics.rejected["unauthorized"] += 1
        why = "no bearer token" if not header else "wrong bearer token"
        return f"unauthorized: {why}; send the header 'Authorization: Bearer <token>'"

    def model_name(self, requested: str | None, what: str = "model") -> str:
        if requested is None:
            return self.config.models[0]
        if requested not in self.config.models:
            self.metrics.rejected["unknown_model"] += 1
            raise GatewayError(404, f"{what} {requested!r} is not served here; choose one of: "
                                    f"{', '.join(self.config.models)}", "model_not_found")
        return requested

    def policy(self, name: str) -> Policy:
        """One policy per upstream model name, kept for the app's life (connections, limits)."""
        if name not in self._policies:
            from rlm_train.policies.spec import build_policies

            self._policies[name], _ = build_policies(f"openai:{name}", None, self.config.base_urls,
                                                     client=self.config.client)
        return self._policies[name]

    def episode_config(self, budget: RequestBudget | None) -> tuple[RLMConfig, list[str]]:
        """The server's RLMConfig lowered by the request's budget; also the fields that were capped."""
        base = self.config.rlm
        if budget is None:
            return base, []
        update: dict[str, Any] = {}
        capped = []
        for name in CAPPED_FIELDS:
            want = getattr(budget, name)
            if want is None:
                continue
            cap = getattr(base, name)
            if cap is not None and want > cap:
                capped.append(name)
                want = cap
            update[name] = want
        if budget.temperature is not None:
            update["temperature"] = budget.temperature
        return base.model_copy(update=update), capped

    def context_file(self, raw: str) -> Path:
        """A context_path resolved (symlinks too) inside an allowed directory, or 403/404/413."""
        if "\x00" in raw:
            raise GatewayError(422, "context_path contains a NUL byte", "invalid_request_error")
        if not self.context_dirs:
            self.metrics.rejected["forbidden_path"] += 1
            raise GatewayError(403, "context files are off on this gateway: send the context inline, or start it "
                                    "with --context-dir DIR", "permission_error")
        given = Path(raw)
        candidates = [given] if given.is_absolute() else [d / given for d in self.context_dirs]
        inside = []
        for candidate in candidates:
            real = candidate.resolve()
            if any(real == d or real.is_relative_to(d) for d in self.context_dirs):
                inside.append(real)
        if not inside:
            self.metrics.rejected["forbidden_path"] += 1
            raise GatewayError(403, f"context_path {raw!r} is outside the directories this gateway reads "
                                    f"contexts from ({', '.join(map(str, self.context_dirs))})", "permission_error")
        for real in inside:
            if real.is_file():
                size = real.stat().st_size
                if size > self.config.max_context_file_bytes:
                    self.metrics.rejected["too_large"] += 1
                    raise GatewayError(413, f"context_path {raw!r} is {size:,} bytes, over the gateway's limit of "
                                            f"{self.config.max_context_file_bytes:,}", "request_too_large")
                return real
        raise GatewayError(404, f"context_path {raw!r}: no such file in the allowed directories", "not_found_error")

    async def load_context(self, context: Any, context_path: str | None) -> Any:
        if context_path is None:
            return context
        path = self.context_file(context_path)
        from rlm_train.formats import read_context_file

        try:
            return await asyncio.to_thread(read_context_file, path)
        except UserError as exc:
            raise GatewayError(422, f"context_path {context_path!r}: {str(exc).split(': ', 1)[-1]}",
                               "invalid_request_error") from None

    def check_query(self, query: str) -> None:
        if len(query) > self.config.max_query_chars:
            raise GatewayError(422, f"the query is {len(query):,} characters, over the gateway's limit of "
                                    f"{self.config.max_query_chars:,}; put long text in the context",
                               "invalid_request_error")

    # -- admission ------------------------------------------------------------------------

    def admit(self) -> None:
        """Take a place in the queue, or 429 at once (nothing started, nothing to lose)."""
        if self.running + self.queued >= self.config.max_concurrent + self.config.max_queue:
            self.metrics.rejected["queue_full"] += 1
            raise GatewayError(429, f"the gateway is full ({self.running} episodes running, {self.queued} waiting); "
                                    f"retry after {self.config.retry_after_s} s", "rate_limit_error",
                               {"Retry-After": str(self.config.retry_after_s)})
        self.queued += 1

    async def admitted(self, work: Any) -> Any:
        """Await `work` for an admitted request; if it fails, give its place in the queue back."""
        try:
            return await work
        except BaseException:
            self.queued -= 1
            raise

    async def run(self, query: str, context: Any, model: str, sub_model: str | None, config: RLMConfig,
                  on_turn: Any = None, on_start: Any = None) -> tuple[TrajectoryRecord, float]:
        """Wait for a slot (the caller was admitted), run one episode, free the slot."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrent)
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        self.metrics.started += 1
        self.metrics.peak_running = max(self.metrics.peak_running, self.running)
        started = time.monotonic()
        try:
            if on_start is not None:
                on_start()
            policy = self.policy(model)
            sub = self.policy(sub_model) if sub_model and sub_model != model else None
            record = await run_episode(query, context, policy, sub, config, on_turn=on_turn)
        finally:
            self.running -= 1
            self._slots.release()
        seconds = time.monotonic() - started
        self.metrics.episode(record, seconds)
        return record, seconds

    async def aclose(self) -> None:
        for policy in self._policies.values():
            await policy.aclose()
        self._policies.clear()


# ---------------------------------------------------------------------------
# Splitting a chat into query and context


def _text(content: str | list[ContentPart] | None) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise GatewayError(422, f"message content part of type {part.type!r}: only text parts are supported",
                               "invalid_request_error")
        texts.append(part.text)
    return texts


def split_chat(messages: list[ChatMessage], explicit_context: bool) -> tuple[str, str | None]:
    """(query, context) from an OpenAI chat. Context None: given explicitly (rlm.context)."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise GatewayError(422, "messages: no user message; the last user message holds the context and the question",
                           "invalid_request_error")
    instructions = "\n\n".join(t for m in messages if m.role in ("system", "developer") for t in _text(m.content)
                               if t.strip())
    parts = [t for t in _text(users[-1].content) if t.strip()]
    if not parts:
        raise GatewayError(422, "messages: the last user message is empty", "invalid_request_error")
    context: str | None
    if explicit_context:
        query, context = "\n\n".join(parts), None
    elif len(parts) > 1:  # content parts: the longest is the context, the others the question
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        context = parts[longest]
        query = "\n\n".join(p for i, p in enumerate(parts) if i != longest)
    else:
        text = parts[0].strip()
        head, sep, tail = text.rpartition("\n\n")
        if sep and head.strip() and tail.strip() and len(tail) <= QUESTION_MAX_CHARS:
            context, query = head, tail.strip()
        else:
            context, query = text, text if len(text) <= QUESTION_MAX_CHARS else DEFAULT_QUERY
    if instructions:
        query = f"{instructions}\n\n{query}"
    return query, context


# ---------------------------------------------------------------------------
# The app


def _result(request_id: str, model: str, record: TrajectoryRecord, effective: RLMConfig, capped: list[str],
            include_trajectory: bool) -> dict[str, Any]:
    usage = tree_usage(record)
    stats = record["stats"]
    return {
        "id": request_id,
        "object": "rlm.result",
        "model": model,
        "answer": record["final"],
        "outcome": str(record["outcome"]),
        "error": record["error"],
        "error_kind": record["error_kind"],
        "usage": {**usage, "turns": stats["turns"], "sub_calls": stats["sub_calls"], "wall_s": stats["wall_s"]},
        "budget": {**{name: getattr(effective, name) for name in CAPPED_FIELDS}, "capped": capped},
        "trajectory": record if include_trajectory else None,
    }


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway's FastAPI app (wrapped in its size/metrics edge by `GatewayThread` or
    `asgi_app`). Raises UserError for a config it cannot run (no upstream, no models, a
    token variable that is not set, a context directory that does not exist)."""
    gateway = Gateway(config)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await gateway.aclose()

    app = FastAPI(title="rlm-train RLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = getattr(exc, "kind", None) or {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error")
        return Response(_error_body(exc.status_code, str(exc.detail), kind), status_code=exc.status_code,
                        media_type="application/json", headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        return Response(_error_body(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                        status_code=500, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        gateway.metrics.rejected["invalid"] += 1
        return Response(_error_body(422, _describe_validation(exc), "invalid_request_error"), status_code=422,
                        media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "running": gateway.running, "queued": gateway.queued,
                      "models": config.models})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(gateway.running, gateway.queued, config),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "rlm-train"}
                                                 for m in config.models]})

    @app.post("/v1/rlm")
    async def rlm(body: RLMRequest) -> Response:
        gateway.check_query(body.query)
        model = gateway.model_name(body.model)
        sub_model = gateway.model_name(body.sub_model or config.sub_model, "sub_model") \
            if (body.sub_model or config.sub_model) else None
        effective, capped = gateway.episode_config(body.budget)
        request_id = f"rlm-{uuid.uuid4().hex[:24]}"
        gateway.admit()
        context = await gateway.admitted(gateway.load_context(body.context, body.context_path))
        headers = {"X-Request-Id": request_id}
        if not body.stream:
            record, _ = await gateway.run(body.query, context, model, sub_model, effective)
            return _json(_result(request_id, model, record, effective, capped, body.include_trajectory),
                         headers=headers)

        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_turn(turn: TurnRecord) -> None:
            queue.put_nowait({"event": "turn", "turn": turn})

        def on_start() -> None:
            queue.put_nowait({"event": "start", "id": request_id, "model": model})

        # Started here, not in the body's generator: the place taken in the queue is given back
        # by the task even if the client leaves before the body is sent.
        task = asyncio.ensure_future(gateway.run(body.query, context, model, sub_model, effective,
                                                 on_turn=on_turn, on_start=on_start))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield orjson.dumps({"event": "queued", "id": request_id, "running": gateway.running,
                                    "queued": gateway.queued}) + b"\n"
                async for event in _drain(queue, task, config.keepalive_s):
                    yield orjson.dumps(event) + b"\n"
                record, _ = task.result()
                yield orjson.dumps({"event": "result", **_result(request_id, model, record, effective, capped,
                                                                 body.include_trajectory)}) + b"\n"
            finally:
                if not task.done():  # the client went away: stop its episode
                    task.cancel()

        return StreamingResponse(events(), media_type="application/x-ndjson", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        ext = body.rlm or RLMExtension()
        explicit = ext.context is not None or ext.context_path is not None
        query, split_context = split_chat(body.messages, explicit)
        gateway.check_query(query)
        model = gateway.model_name(body.model)
        sub_name = ext.sub_model or config.sub_model
        sub_model = gateway.model_name(sub_name, "sub_model") if sub_name else None
        budget = ext.budget
        if body.temperature is not None and (budget is None or budget.temperature is None):
            budget = (budget or RequestBudget()).model_copy(update={"temperature": body.temperature})
        effective, capped = gateway.episode_config(budget)
        request_id = f"chatcmpl-rlm-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        gateway.admit()
        context = await gateway.admitted(gateway.load_context(ext.context, ext.context_path)) if explicit \
            else split_context

        def extension(record: TrajectoryRecord) -> dict[str, Any]:
            result = _result(request_id, model, record, effective, capped, ext.include_trajectory)
            return {k: result[k] for k in ("outcome", "error", "error_kind", "budget", "trajectory")} | {
                "turns": record["stats"]["turns"], "sub_calls": record["stats"]["sub_calls"],
                "wall_s": record["stats"]["wall_s"]}

        if not body.stream:
            record, _ = await gateway.run(query, context, model, sub_model, effective)
            failure = _upstream_failure(record)
            if failure is not None:
                return Response(_error_body(*failure), status_code=failure[0], media_type="application/json")
            return _json({
                "id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": record["final"] or ""},
                             "finish_reason": _finish_reason(record)}],
                "usage": tree_usage(record),
                "rlm": extension(record),
            })

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def on_turn(turn: TurnRecord) -> None:
            queue.put_nowait({"event": "turn", "index": turn["index"]})

        task = asyncio.ensure_future(gateway.run(query, context, model, sub_model, effective, on_turn=on_turn))

        async def sse() -> AsyncIterator[bytes]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for event in _drain(queue, task, config.keepalive_s):
                    # SSE comments: clients skip them; proxies see a live connection.
                    yield (f": turn {event['index'] + 1} done\n\n" if event["event"] == "turn" else ": ping\n\n").encode()
                record, _ = task.result()
                failure = _upstream_failure(record)
                if failure is not None:
                    yield b"data: " + _error_body(*failure) + b"\n\n"
                else:
                    if record["final"]:
                        yield chunk({"content": record["final"]})
                    yield chunk({}, _finish_reason(record), rlm=extension(record))
                    if include_usage:
                        payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "choices": [], "usage": tree_usage(record)}
                        yield b"data: " + orjson.dumps(payload) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                if not task.done():
                    task.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _drain(queue: asyncio.Queue, task: asyncio.Future, keepalive_s: float) -> AsyncIterator[dict[str, Any]]:
    """Events from the queue until the task is done, with a ping after each quiet keepalive_s."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        if task in done:
            while not queue.empty():
                yield queue.get_nowait()
            return
        yield {"event": "ping"}


def _finish_reason(record: TrajectoryRecord) -> str:
    return "stop" if record["final"] is not None else "length"


def _upstream_failure(record: TrajectoryRecord) -> tuple[int, str, str] | None:
    """A chat completion cannot carry an episode that failed: upstream failures are 502, others 500."""
    if record["outcome"] != Outcome.ERROR or record["final"] is not None:
        return None
    reason = (record["error"] or "the episode failed").strip().splitlines()[0]
    if record["error_kind"] == "model":
        return 502, f"the upstream model failed: {reason}", "upstream_error"
    return 500, f"the RLM episode failed ({record['error_kind']}): {reason}", "server_error"


def asgi_app(app: FastAPI) -> Any:
    """The app inside its edge layer (body size limit, status counts): what uvicorn serves."""
    return _Edge(app, app.state.gateway)


# ---------------------------------------------------------------------------
# Running it


class GatewayThread:
    """uvicorn serving the gateway in a background thread, on a socket bound before it starts
    (so a port in use is a UserError here, and port 0 is known at once)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        from rlm_train.serve.launcher import check_port_free

        self.host = host
        if port:
            check_port_free(host, port, "--gateway-port")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(asgi_app(app), log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                                access_log=False, backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="rlm-gateway", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"http://{host}:{self.port}"

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> "GatewayThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the RLM gateway did not start on {self.url}: {self.error or 'see the log above'}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(15)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def list_upstream_models(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids an OpenAI-compatible server lists at /models (a UserError when it cannot)."""
    import urllib.request

    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key or 'EMPTY'}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
        return [str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot list the models at {url} ({exc}); is the server up? Or name them with "
                        "--gateway-model NAME") from None
