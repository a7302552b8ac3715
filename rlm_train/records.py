"""The records stages exchange, defined once: tasks and trajectories (`rlm-train/task/v1`,
`rlm-train/trajectory/v1`), with the turn, execution, sub-call and stats records inside.

They are TypedDicts: the JSON on disk is exactly these dicts (a type checker sees every
key the code reads or writes; nothing converts them). `Outcome` and `ErrorKind` are
str enums, so they compare equal to, and serialize as, the strings files already hold.
Kept at the bottom of the import graph with formats.py.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, NotRequired, TypedDict

TASK_SCHEMA = "rlm-train/task/v1"
TRAJECTORY_SCHEMA = "rlm-train/trajectory/v1"


class Outcome(enum.StrEnum):
    """How an episode ended (trajectory["outcome"])."""

    FINAL = "final"  # the model answered with FINAL / FINAL_VAR
    MAX_ITERATIONS = "max_iterations"  # answered only on the forced last turn, or not at all
    BUDGET = "budget_exhausted"  # a call-tree budget (sub-calls, tokens, wall, ...) ran out
    ERROR = "error"  # the episode could not go on (server unreachable, ...)


class ErrorKind(enum.StrEnum):
    """Who failed when the outcome is `error` (trajectory["error_kind"])."""

    MODEL = "model"  # a root model call failed after the client's retries
    REFUSED = "refused"  # the server answered a root call with a refusal (HTTP 400/413/422: e.g. past its window)
    SANDBOX = "sandbox"  # the REPL sandbox could not start or keep a worker
    INTERNAL = "internal"  # anything else (a bug)


# --------------------------------------------------------------------------- task
class TaskRecord(TypedDict):
    schema: str
    id: str
    family: str
    query: str
    answer: Any
    scorer: str
    meta: NotRequired[dict[str, Any]]
    context: NotRequired[Any]  # inline, or
    context_path: NotRequired[str]  # a file next to the task file (big contexts)


def check_task(obj: Any, task_file: str | Path | None = None, seen: set[str] | None = None) -> str | None:
    """Why this object is not a runnable task, or None. The one task validator: the task
    file loader, GRPO's prompt rows and context loading all use it. `seen` catches
    duplicate ids; `task_file` lets a `context_path` be checked on disk."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if obj.get("schema") != TASK_SCHEMA:
        return f"schema is {obj.get('schema')!r}, expected {TASK_SCHEMA!r}"
    task_id = obj.get("id")
    if not isinstance(task_id, str) or not task_id:
        return "field 'id' must be a non-empty string"
    if seen is not None and task_id in seen:
        return f"duplicate task id {task_id!r}"
    if not isinstance(obj.get("query"), str) or not obj["query"].strip():
        return f"task {task_id!r}: field 'query' must be a non-empty string"
    if "context" in obj and (obj["context"] is None or (isinstance(obj["context"], (str, list, dict))
                                                        and not (obj["context"].strip() if isinstance(obj["context"], str)
                                                                 else obj["context"]))):
        return f"task {task_id!r}: field 'context' is empty; an RLM answers a question about its context"
    if "context" not in obj:
        rel = obj.get("context_path")
        if not isinstance(rel, str) or not rel:
            return f"task {task_id!r} has neither 'context' nor 'context_path'"
        if task_file is not None and not (Path(task_file).parent / rel).is_file():
            return f"task {task_id!r}: context_path {rel!r} not found next to the task file"
    if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
        return f"task {task_id!r}: field 'meta' must be an object"
    return None


# --------------------------------------------------------------------------- trajectory
# What a recorded cell result is: the filter writes it into its report, the viewer shows it.
CELL_RESULTS_NOTE = (
    "A cell's recorded result (its output, error and FINAL) is what the episode's REPL returned, not proof "
    "of what that cell's code did: an earlier cell of the same episode runs in the same interpreter and can "
    "decide what later cells return. It cannot reach another episode, the host or the score: the score is "
    "computed on the host, from the episode's final answer against a reference the sandbox never sees."
)


class ExecutionRecord(TypedDict):
    """One code block run in the REPL."""

    code: str
    stdout: str
    stderr: str
    error: str | None
    timed_out: bool
    final: str | None
    truncated_chars: int
    wall_s: float
    error_kind: NotRequired[str | None]  # timeout / limit / sandbox when the sandbox ended the cell


class SubCallRecord(TypedDict):
    """One llm_query / rlm_query made from a cell."""

    kind: str  # "llm" or "rlm"
    depth: int
    prompt: str | None  # clipped to RLMConfig.record_chars
    prompt_chars: int
    response: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    error: str | None
    child: NotRequired[EpisodeRecord]  # the child RLM's episode (rlm_query)


class TurnRecord(TypedDict):
    """One root turn: the model's text, the code it ran, what came back."""

    index: int
    assistant: str
    forced: bool  # the "answer now" turn after max_iterations
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    code_blocks: list[str]
    executions: list[ExecutionRecord]
    sub_calls: list[SubCallRecord]
    final: str | None
    parse_error: str | None
    feedback: NotRequired[str]  # the next user message, when the episode went on


class RecordingStats(TypedDict):
    """What the record left out under the trajectory budget (RLMConfig.trajectory_chars)."""

    budget_chars: int
    charged_chars: int  # counted against the budget (the root's own conversation is not)
    truncated: bool  # something was left out: dropped_texts or episodes_without_text
    dropped_texts: int  # cell and sub-call texts replaced by "[N chars not recorded: ...]"
    dropped_chars: int  # their characters, and those of the children's left-out conversations
    episodes_without_text: int  # child RLMs kept as counts only (tokens, outcomes, stats; no text)


class EpisodeStats(TypedDict):
    turns: int
    sub_calls: int
    root_sub_calls: int
    prompt_tokens: int
    completion_tokens: int
    episode_wall_s: float
    subcalls_total: NotRequired[int]  # the whole call tree (root episode only)
    tokens_total: NotRequired[int]
    wall_s: NotRequired[float]
    recording: NotRequired[RecordingStats]  # root only; absent in records older than the budget
    sandbox_wait_s: NotRequired[float]  # waited for a sandbox (its tree's or the gateway's all in use)


class EpisodeRecord(TypedDict):
    """One RLM episode at any depth (a child RLM's is nested in its sub-call)."""

    query: str
    depth: int
    messages: list[dict[str, Any]]
    turns: list[TurnRecord]
    final: str | None
    outcome: Outcome  # on disk its string value; a record read back holds the equal str
    error: str | None
    error_kind: ErrorKind | None  # set when outcome is error
    score: float | None
    stats: EpisodeStats


class TrajectoryRecord(EpisodeRecord):
    """The root episode as stored: `rlm-train/trajectory/v1`. `generate` adds the
    provenance fields marked NotRequired."""

    schema: str
    id: str
    task_id: str | None
    policy: str
    sub_policy: str
    config: dict[str, Any]
    sample: NotRequired[int]  # which of the task's samples (generate, eval)
    family: NotRequired[str | None]
    score_error: NotRequired[str]  # the scorer raised: why
