"""The one-shot row (`one_shot: PATH` on a method): the method's root model gets one solved
teacher trajectory of the task's family as a worked example in its system prompt.

`pick_examples` reads a trajectory store (a `rlm-train generate` output directory, or one
trajectory JSONL file) and keeps, per family, the solved trajectory with the highest score;
ties go to the shortest rendered example, then the smallest (task id, sample, id), so the
choice is the same on every machine. Trajectories of the eval's own tasks are never used.
`render_example` writes its root conversation as the model saw it (the query, each turn's
reply and the REPL output that came back), each message clipped.

`OneShotPolicy` wraps the method's root policy: on an episode's root turns it appends the
example of the call's family to the system message; sub-calls and child RLMs are untouched.
The loop records the conversation it built, without the example, so the eval writes what
each family's example was to OUT/one_shot/METHOD.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.models.base import CallContext, Completion, Message, Policy, Role, SamplingParams
from rlm_train.records import TrajectoryRecord

# Clipping: a worked example shows the shape of a solution; a whole context dump would
# crowd out the task's own turns in a small model's window.
MESSAGE_CHARS = 1500  # one reply or the query
FEEDBACK_CHARS = 600  # one REPL output
EXAMPLE_CHARS = 6000  # the whole example; later turns past it are left out with a note
EXAMPLE_HEADER = ("Here is a worked example: a solved task of the same kind (another question about another "
                  "context), with the replies that solved it and the REPL output each one got back.")


@dataclasses.dataclass(frozen=True)
class Example:
    """One family's worked example and where it came from."""

    family: str
    text: str
    trajectory_id: str
    task_id: str | None
    sample: int | None
    score: float


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit:,} more characters cut]"


def render_example(record: Mapping[str, Any]) -> str:
    """A solved trajectory's root conversation as prompt text (its system prompt left out:
    the model has its own)."""
    parts = [EXAMPLE_HEADER]
    used = len(parts[0])
    messages = [m for m in record.get("messages") or [] if m.get("role") != "system"]
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            block = "[assistant]\n" + _clip(str(message.get("content") or ""), MESSAGE_CHARS)
        elif i == 0:
            block = "[user]\n" + _clip(str(message.get("content") or ""), MESSAGE_CHARS)
        else:
            block = "[user: REPL output]\n" + _clip(str(message.get("content") or ""), FEEDBACK_CHARS)
        if used + len(block) > EXAMPLE_CHARS:
            parts.append(f"[... {len(messages) - i} more message(s) of the example left out]")
            break
        parts.append(block)
        used += len(block)
    parts.append("[end of the example]")
    return "\n\n".join(parts)


def pick_examples(path: str | Path, families: Iterable[str], exclude_task_ids: Iterable[str]) -> dict[str, Example]:
    """Per family in `families`, the best solved trajectory in the store at `path` (see the
    module docstring). A store with no trajectories, or no solved one of a family, is a
    UserError naming the path (and the family)."""
    from rlm_train.rollouts import store

    source = Path(path).expanduser()
    if not source.exists():
        raise UserError(f"one_shot {path}: no such trajectory directory or file (the --out of `rlm-train generate`)")
    records: list[TrajectoryRecord] = store.read_records(source)
    if not records:
        raise UserError(f"one_shot {path}: holds no trajectories (the --out of a `rlm-train generate` run)")
    excluded = set(exclude_task_ids)
    best: dict[str, tuple[tuple[Any, ...], Example]] = {}
    for record in records:
        family = record.get("family")
        score = record.get("score")
        if family is None or record.get("final") is None or not score or record.get("task_id") in excluded:
            continue
        text = render_example(record)
        key = (-float(score), len(text), str(record.get("task_id")), record.get("sample") or 0, record["id"])
        if family not in best or key < best[family][0]:
            best[family] = (key, Example(family, text, record["id"], record.get("task_id"), record.get("sample"),
                                         float(score)))
    out = {}
    for family in families:
        if family not in best:
            raise UserError(f"one_shot {path}: no solved trajectory of family {family!r} (one with a final answer "
                            "and a score above 0, of a task the eval does not hold)")
        out[family] = best[family][1]
    return out


class OneShotPolicy:
    """A root policy with a worked example in its system prompt (see the module docstring)."""

    def __init__(self, inner: Policy, examples: Mapping[str, Example], source: str):
        self.inner = inner
        self.examples = dict(examples)
        self.name = one_shot_name(getattr(inner, "name", "policy"), source)
        self.writes_code = getattr(inner, "writes_code", True)

    @property
    def stats(self) -> Any:  # the wrapped client's retry counts, for the run summary
        return getattr(self.inner, "stats", None)

    async def chat(self, messages: list[Message], sampling: SamplingParams | None = None,
                   call: CallContext | None = None) -> Completion:
        example = self.examples.get(str(call.hints.get("family"))) if call is not None else None
        if (call is not None and call.role == Role.ROOT and call.depth == 0 and example is not None
                and messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": f"{messages[0]['content']}\n\n{example.text}"}, *messages[1:]]
        return await self.inner.chat(messages, sampling, call)

    async def aclose(self) -> None:
        await self.inner.aclose()


def one_shot_name(spec: str, source: str) -> str:
    """What the records and the run's identity call a one-shot method."""
    return f"one-shot[{source}]:{spec}"
