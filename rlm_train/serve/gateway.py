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
  message is the question; the context is `"rlm": {"context" | "context_path"}` in the body
  (the openai client's `extra_body`), else the messages before it, else (one message) the
  message itself (gateway_chat.py). `max_tokens` / `stop` cut the answer; parameters it would
  not honour get 400 naming them. The response is a `chat.completion` whose content is the
  answer, plus an `rlm` object (outcome, turns, budget, ...).
- `GET /v1/models`, `GET /health` (no auth), `GET /metrics` (Prometheus text).

Limits: a body is read under the reading budget (`max_reading_bytes`, per client address
`max_client_reading_bytes`: 503 / 429 before a byte is read, gateway_body.py) and decoded; only
then does the request take an admission place: episodes run `max_concurrent` at a time with
`max_queue` waiting, beyond that 429 with Retry-After (nothing is started, so nothing is lost);
bodies over `max_body_bytes` or `max_body_items` get 413; malformed bodies 422; a
`context_path` outside the allowed directories 403; a missing or wrong bearer token 401; a
foreign Host 403. Deadlines, the connection cap and the checks made before a body is read are
in gateway_http.py. A request's budget may lower the server's `rlm` settings, never raise them.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlm_train.errors import UserError
from rlm_train.models.base import Policy
from rlm_train.records import TrajectoryRecord, TurnRecord
from rlm_train.rlm import RLMConfig, run_episode
from rlm_train.rlm.budget import SandboxSlots
from rlm_train.serve.config import GatewayConfig

# Request budgets capped by the server's RLMConfig (a request may lower them, never raise them).
from rlm_train.serve.gateway_api import _finish_reason, _result, _upstream_failure, CAPPED_FIELDS, GatewayError, RLMExtension, RLMRequest, RequestBudget, _error_body, _json
from rlm_train.serve.gateway_chat import ChatRequest, check_parameters, limit_answer, load_answer_tokenizer, split_chat
from rlm_train.serve.gateway_body import ModelT, ReadingBudget, read_json
from rlm_train.serve.gateway_http import check_context_path, find_context_file
from rlm_train.serve.gateway_metrics import Metrics, tree_usage
from rlm_train.serve.gateway_tree import fair_share, unless_client_leaves

# ---------------------------------------------------------------------------
# The gateway's state


class Gateway:
    """Policies, the reading budget, admission (running + queued), budgets, context files and
    metrics of one app."""

    def __init__(self, config: GatewayConfig):
        if not config.base_urls:
            raise UserError("the gateway needs an upstream server: pass --base-url http://HOST:PORT/v1 (or --model)")
        if not config.models:
            raise UserError("the gateway needs the upstream model names: pass --gateway-model NAME")
        self.config = config
        self.metrics = Metrics()
        self.reading = ReadingBudget(config, self.metrics.rejected)
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
        self.rlm = fair_share(config)
        self.tokenizer = load_answer_tokenizer(config.tokenizer) if config.tokenizer else None
        self.sandboxes = SandboxSlots(config.max_sandboxes, name="the gateway's sandboxes (gateway.max_sandboxes)")

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
        base = self.rlm
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

    async def load_context(self, context: Any, context_path: str | None) -> Any:
        if context_path is None:
            return context
        from rlm_train.formats import read_context_file

        check_context_path(context_path)  # before anything resolves it
        try:
            path = await asyncio.to_thread(find_context_file, context_path, self.context_dirs,
                                           self.config.max_context_file_bytes)
        except GatewayError as exc:
            self.metrics.rejected[{403: "forbidden_path", 413: "too_large"}.get(exc.status_code, "invalid")] += 1
            raise
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

    async def read(self, request: Request, model: type[ModelT]) -> ModelT:
        """The request's body, read under the reading budget and decoded (gateway_body.py)."""
        return await read_json(request, model, self.reading, self.config.max_body_items)

    def admit(self) -> None:
        """Take a place in the queue, or 429 at once (nothing started, nothing to lose). Called
        once the body is read and decoded, with no await before the place is used or given back."""
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
            record = await run_episode(query, context, policy, sub, config, on_turn=on_turn, sandboxes=self.sandboxes)
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
# The app


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
    async def _bug(request: Request, exc: Exception) -> Response:  # the traceback goes to the operator's log
        return Response(_error_body(500, f"internal error ({type(exc).__name__}); the gateway's log has the "
                                         "details", "server_error"), status_code=500, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "running": gateway.running, "queued": gateway.queued,
                      "models": config.models})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(gateway.running, gateway.queued, config, gateway.sandboxes,
                                                      gateway.reading),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "rlm-train"}
                                                 for m in config.models]})

    @app.post("/v1/rlm")
    async def rlm(request: Request) -> Response:
        body = await gateway.read(request, RLMRequest)  # a body that trickles in holds no admission place
        gateway.check_query(body.query)
        sub_name = body.sub_model or config.sub_model
        effective, capped = gateway.episode_config(body.budget)
        model = gateway.model_name(body.model)
        sub_model = gateway.model_name(sub_name, "sub_model") if sub_name else None
        gateway.admit()
        context = await gateway.admitted(gateway.load_context(body.context, body.context_path))
        request_id = f"rlm-{uuid.uuid4().hex[:24]}"
        headers = {"X-Request-Id": request_id}
        if not body.stream:
            record, _ = await unless_client_leaves(request, gateway.run(body.query, context, model, sub_model, effective))
            note_usage(request, record)
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
                note_usage(request, record)
                yield orjson.dumps({"event": "result", **_result(request_id, model, record, effective, capped,
                                                                 body.include_trajectory)}) + b"\n"
            finally:
                if not task.done():  # the client went away: stop its episode
                    task.cancel()

        return StreamingResponse(events(), media_type="application/x-ndjson", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await gateway.read(request, ChatRequest)  # a body that trickles in holds no admission place
        check_parameters(body, gateway.tokenizer is not None)
        ext = body.rlm or RLMExtension()
        explicit = ext.context is not None or ext.context_path is not None
        query, split_context = split_chat(body.messages, explicit)
        gateway.check_query(query)
        sub_name = ext.sub_model or config.sub_model
        budget = ext.budget
        if body.temperature is not None and (budget is None or budget.temperature is None):
            budget = (budget or RequestBudget()).model_copy(update={"temperature": body.temperature})
        effective, capped = gateway.episode_config(budget)
        model = gateway.model_name(body.model)
        sub_model = gateway.model_name(sub_name, "sub_model") if sub_name else None
        gateway.admit()
        context = await gateway.admitted(gateway.load_context(ext.context, ext.context_path)) if explicit \
            else split_context
        request_id = f"chatcmpl-rlm-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        async def answer(record: TrajectoryRecord) -> tuple[str, str]:
            """The reply's content (cut by `stop` and `max_tokens`) and finish_reason."""
            final = record["final"] or ""
            if not final or (not body.stop_strings and body.answer_tokens is None):
                return final, _finish_reason(record)
            content, cut = await asyncio.to_thread(limit_answer, final, body.stop_strings, body.answer_tokens,
                                                   gateway.tokenizer)
            return content, "length" if cut else _finish_reason(record)

        def extension(record: TrajectoryRecord) -> dict[str, Any]:
            result = _result(request_id, model, record, effective, capped, ext.include_trajectory)
            return {k: result[k] for k in ("outcome", "error", "error_kind", "budget", "trajectory")} | {
                "turns": record["stats"]["turns"], "sub_calls": record["stats"]["sub_calls"],
                "wall_s": record["stats"]["wall_s"]}

        if not body.stream:
            record, _ = await unless_client_leaves(request, gateway.run(query, context, model, sub_model, effective))
            note_usage(request, record)
            failure = _upstream_failure(record)
            if failure is not None:
                return Response(_error_body(*failure), status_code=failure[0], media_type="application/json")
            content, finish = await answer(record)
            return _json({
                "id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish}],
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
                note_usage(request, record)
                failure = _upstream_failure(record)
                if failure is not None:
                    yield b"data: " + _error_body(*failure) + b"\n\n"
                else:
                    content, finish = await answer(record)
                    if content:
                        yield chunk({"content": content})
                    yield chunk({}, finish, rlm=extension(record))
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


def note_usage(request: Request, record: TrajectoryRecord) -> None:
    """The tokens an episode spent, for the request's access log line (gateway_http.Edge)."""
    request.state.rlm_tokens = tree_usage(record)["total_tokens"]


async def _drain(queue: asyncio.Queue, task: asyncio.Future, keepalive_s: float) -> AsyncIterator[dict[str, Any]]:
    """Events from the queue until the task is done, with a ping after each quiet keepalive_s."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter, task}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled with the stream (its client left): no getter left pending
            if not getter.done():
                getter.cancel()
        if getter in done:
            yield getter.result()
            continue
        if task in done:
            while not queue.empty():
                yield queue.get_nowait()
            return
        yield {"event": "ping"}
