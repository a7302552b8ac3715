"""The scripted teacher: a policy with no model that writes the REPL programs a strong
RLM would (peek, grep, partition + llm_query_batched, aggregate, FINAL), with varied
strategies and wording. It makes real trajectories on any machine.

Each task family has a strategy here, `next_turn(view) -> str`, registered by family
name in `registry` (`register_strategy`); the teacher picks it from the call's
hints["family"] (the loop passes the caller's hints through), and falls back to `generic`
for unknown families and for child RLMs.
"""

from __future__ import annotations

import random
import re

from rlm_train.models.base import CallablePolicy, CallContext, Message, Role
from rlm_train.policies.scripted import oolong
from rlm_train.policies.scripted.registry import Strategy, register_strategy, strategy_for
from rlm_train.policies.scripted.view import EpisodeView, repl_block

_WORD_RE = re.compile(r"[A-Za-z0-9']+")


# Variants of the teacher (`scripted:NAME` specs): family -> the strategy used instead.
# most-frequent-kind: the most-frequent-kind floor, which on oolong always writes the
# program of the kind most frequent in training (a count of one label), whatever is asked.
VARIANTS: dict[str, dict[str, Strategy]] = {"most-frequent-kind": {"oolong": oolong.most_frequent_kind_turn}}


class ScriptedTeacher(CallablePolicy):
    """The teacher (`scripted`); `variant="most-frequent-kind"` (`scripted:most-frequent-kind`)
    is the most-frequent-kind floor, an eval baseline, not a teacher (see VARIANTS)."""

    def __init__(self, variant: str | None = None):
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown scripted teacher variant {variant!r}; known: {', '.join(VARIANTS)}")
        super().__init__(self._answer, name=f"scripted:{variant}" if variant else "scripted")
        self._overrides = VARIANTS[variant] if variant else {}

    def _answer(self, messages: list[Message], call: CallContext) -> str:
        if call.role == Role.SUB:
            return extractive_answer(messages[-1]["content"])
        return self._root_turn(messages, call)

    def _root_turn(self, messages: list[Message], call: CallContext) -> str:
        user_messages = [m["content"] for m in messages if m["role"] == "user"]
        hints = call.hints
        view = EpisodeView(
            query=call.query or user_messages[0],
            turn=sum(1 for m in messages if m["role"] == "assistant"),
            outputs=user_messages[1:],
            last_turn=call.last_turn,
            rng=random.Random(f"{hints.get('task_id')}:{hints.get('sample', 0)}:{call.depth}"),
            hints=hints,
        )
        family = hints.get("family") if call.depth == 0 else None
        return self._overrides.get(family or "", strategy_for(family))(view)


def extractive_answer(prompt: str) -> str:
    """The teacher as a sub-model: return the lines of the prompt that share the most
    words with its first line (the instruction). Crude, but honest and deterministic."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not lines:
        return ""
    question = set(w.lower() for w in _WORD_RE.findall(lines[0]) if len(w) > 3)
    scored = []
    for line in lines[1:]:
        overlap = len(question & set(w.lower() for w in _WORD_RE.findall(line)))
        if overlap:
            scored.append((overlap, line))
    scored.sort(key=lambda pair: -pair[0])
    return "\n".join(line for _, line in scored[:3]) or "NOT FOUND"


__all__ = ["EpisodeView", "ScriptedTeacher", "extractive_answer", "register_strategy", "repl_block", "strategy_for"]
