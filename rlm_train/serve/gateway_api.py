"""The RLM gateway's request and response shapes, its error bodies, and how a chat
request becomes a query and a context. Pure: no server state (gateway.py uses these)."""

from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import orjson
from fastapi import HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rlm_train.records import Outcome, TrajectoryRecord
from rlm_train.rlm import RLMConfig
from rlm_train.serve.gateway_metrics import tree_usage


# Request budgets capped by the server's RLMConfig (a request may lower them, never raise them).

CAPPED_FIELDS = ("max_iterations", "max_depth", "max_subcalls", "max_tokens", "max_wall_s",
                 "root_max_tokens", "sub_max_tokens")
QUESTION_MAX_CHARS = 4000  # a last paragraph longer than this is not a question: the whole message is context
DEFAULT_QUERY = "Answer the request in the context."
_ENDPOINTS = ("/v1/rlm", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


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


# An absolute path of two or more components, not part of a URL or of a longer word.
_HOST_PATH = re.compile(r"(?<![\w/.:~-])/(?:[^\s/'\"(),;:]+/)+([^\s/'\"(),;:]*)")


def scrub_paths(text: str) -> str:
    """`text` without host paths: each absolute path becomes its last component."""
    return _HOST_PATH.sub(lambda m: m.group(1) or "(a directory)", text)


def _error_body(status: int, message: str, kind: str) -> bytes:
    """Every error body the gateway sends: one line, no host paths."""
    line = scrub_paths(" ".join(message.split()))
    return orjson.dumps({"error": {"message": line, "type": kind, "code": status}})


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def describe_errors(errors: Sequence[Any]) -> str:
    """One line from pydantic's errors (the first five)."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


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


def _result(request_id: str, model: str, record: TrajectoryRecord, effective: RLMConfig, capped: list[str],
            include_trajectory: bool) -> dict[str, Any]:
    usage = tree_usage(record)
    stats = record["stats"]
    error = scrub_paths(record["error"]) if record["error"] else record["error"]
    return {
        "id": request_id,
        "object": "rlm.result",
        "model": model,
        "answer": record["final"],
        "outcome": str(record["outcome"]),
        "error": error,
        "error_kind": record["error_kind"],
        "usage": {**usage, "turns": stats["turns"], "sub_calls": stats["sub_calls"], "wall_s": stats["wall_s"]},
        "budget": {**{name: getattr(effective, name) for name in CAPPED_FIELDS}, "capped": capped},
        "trajectory": _scrub_errors(record) if include_trajectory else None,
    }


def _scrub_errors(record: Any) -> Any:
    """A trajectory whose `error` fields (the episode's, its children's) carry no host paths;
    everything else as recorded (what the model and the REPL wrote is the client's own)."""
    if isinstance(record, dict):
        return {k: scrub_paths(v) if k == "error" and isinstance(v, str) else _scrub_errors(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_scrub_errors(v) for v in record]
    return record


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


def _too_large(limit: int) -> str:
    return (f"request body larger than the gateway's limit of {limit:,} bytes; send a big context as a file "
            "(context_path, in a directory the gateway allows) or raise gateway.max_body_bytes")
