"""The RLM gateway's request and response shapes and its error bodies (a chat request's:
gateway_chat.py). Pure: no server state (gateway.py uses these)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import orjson
from fastapi import HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rlm_train.records import ErrorKind, Outcome, TrajectoryRecord
from rlm_train.rlm import RLMConfig
from rlm_train.serve.gateway_metrics import tree_usage


# Request budgets capped by the server's RLMConfig (a request may lower them, never raise them).

CAPPED_FIELDS = ("max_iterations", "max_depth", "max_subcalls", "max_tokens", "max_wall_s",
                 "root_max_tokens", "sub_max_tokens")
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
    if record["error_kind"] in (ErrorKind.MODEL, ErrorKind.REFUSED):
        return 502, f"the upstream model failed: {reason}", "upstream_error"
    return 500, f"the RLM episode failed ({record['error_kind']}): {reason}", "server_error"


def _too_large(limit: int) -> str:
    return (f"request body larger than the gateway's limit of {limit:,} bytes; send a big context as a file "
            "(context_path, in a directory the gateway allows) or raise gateway.max_body_bytes")
