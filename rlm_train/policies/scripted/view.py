"""What a scripted-teacher strategy sees when it writes its next turn, and how it writes code."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class EpisodeView:
    query: str
    """The question the root RLM was asked."""
    turn: int
    """0-based index of the assistant turn being written."""
    outputs: list[str]
    """The REPL feedback (user message text) that followed each earlier assistant turn, in order."""
    last_turn: bool
    """True when the loop has asked for the final answer now (no more code will run)."""
    rng: random.Random
    """Seeded from (task id, sample index): vary strategy and wording reproducibly."""
    hints: Mapping[str, Any] = field(default_factory=dict)
    """Side information from the caller: family, task_id, sample, meta (never the answer). Read-only."""

    @property
    def last_output(self) -> str:
        """The REPL feedback to the previous turn ("" on the first turn)."""
        return self.outputs[-1] if self.outputs else ""

    @property
    def all_outputs(self) -> str:
        """Every REPL feedback so far, joined: for checking what an earlier turn printed."""
        return "\n".join(self.outputs)


def double_quoted(text: str) -> str:
    """`text` as a Python string literal, always in double quotes: repr() picks the quote by
    content, and a question with a quoted 'label' would then switch style between tasks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def repl_block(code: str) -> str:
    """`code` as the fenced ```repl block the RLM loop runs."""
    return f"```repl\n{code.strip()}\n```"
