"""The trajectory budget (`RLMConfig.trajectory_chars`): how much text one episode's record
holds across its turns and its children.

Charged in the order things happen: the code and output of every cell, every sub-call's
prompt and response (each already clipped to `record_chars`) and, when a child RLM ends, its
whole conversation (query, messages, turns' text, answer). Past the budget a cell's or a
sub-call's text is replaced by a marker with its length, and a child RLM is kept as counts
only: its turns, sub-calls and children with their tokens, latencies, outcomes and stats,
every text a marker, no messages and no cells. The root's own conversation (its messages,
its turns' text and its answer) is always recorded: it is the training data, and the RLM
config bounds it (max_iterations, root_max_tokens, feedback_chars). `stats()` goes into the
root's `stats["recording"]`, so every record says whether, and how much, was left out.

Cells' texts are charged when their turn ends (after the children its cells started), once
the model's feedback was built from them: the model always reads the whole output, only the
record is cut.
"""

from __future__ import annotations

import re

from rlm_train.records import EpisodeRecord, RecordingStats, TurnRecord

NOT_RECORDED = "[{:,} chars not recorded: past rlm.trajectory_chars]"
_MARKER = re.compile(r"\[[\d,]+ chars not recorded: past rlm\.trajectory_chars\]")


class Recording:
    """One call tree's count against its trajectory budget (all on the event loop)."""

    def __init__(self, budget_chars: int):
        self.budget_chars = budget_chars
        self.charged = 0
        self.full = False  # once something did not fit, nothing later is recorded either
        self.dropped_texts = 0
        self.dropped_chars = 0
        self.episodes_without_text = 0

    def _fits(self, chars: int) -> bool:
        if not self.full and self.charged + chars <= self.budget_chars:
            self.charged += chars
            return True
        self.full = True
        return False

    def text(self, value: str) -> str:
        """`value`, or a marker with its length once the budget is spent."""
        if self._fits(len(value)):
            return value
        self.dropped_texts += 1
        self.dropped_chars += len(value)
        return NOT_RECORDED.format(len(value))

    def optional(self, value: str | None) -> str | None:
        """`text` for a field where None means something (no error, no answer): it stays None."""
        return None if value is None else self.text(value)

    def turn(self, turn: TurnRecord) -> None:
        """Charge a turn's cells and sub-calls (children were charged as they ended)."""
        for ex in turn["executions"]:
            ex["code"], ex["stdout"], ex["stderr"] = self.text(ex["code"]), self.text(ex["stdout"]), self.text(ex["stderr"])
            ex["error"], ex["final"] = self.optional(ex["error"]), self.optional(ex["final"])
        for call in turn["sub_calls"]:
            call["prompt"], call["response"] = self.optional(call["prompt"]), self.optional(call["response"])

    def child(self, episode: EpisodeRecord) -> EpisodeRecord:
        """A child RLM's record as its parent keeps it: whole when its conversation fits,
        else counts only."""
        texts = [episode["query"], episode["final"], episode["error"], *(m.get("content") for m in episode["messages"])]
        for turn in episode["turns"]:
            texts += [turn["assistant"], *turn["code_blocks"], turn.get("feedback")]
        chars = sum(len(t) for t in texts if isinstance(t, str))
        if self._fits(chars):
            return episode
        self.episodes_without_text += 1
        self.dropped_chars += chars
        return counts_only(episode)

    def stats(self) -> RecordingStats:
        return {"budget_chars": self.budget_chars, "charged_chars": self.charged,
                "truncated": bool(self.dropped_texts or self.episodes_without_text),
                "dropped_texts": self.dropped_texts, "dropped_chars": self.dropped_chars,
                "episodes_without_text": self.episodes_without_text}


def _marker(value: str | None) -> str | None:
    if value is None or _MARKER.fullmatch(value):  # a nested child's text was counted already
        return value
    return NOT_RECORDED.format(len(value))


def counts_only(episode: EpisodeRecord) -> EpisodeRecord:
    """An episode's record without its text: its turns, their sub-calls and its children keep
    every count (tokens, latencies, outcomes, stats: what usage reports add up); each text is
    a marker with its length; messages and cells are left out."""
    turns = []
    for turn in episode["turns"]:
        calls = []
        for call in turn["sub_calls"]:
            kept = call.copy()
            kept["prompt"], kept["response"] = _marker(call["prompt"]), _marker(call["response"])
            if "child" in call:
                kept["child"] = counts_only(call["child"])
            calls.append(kept)
        stripped = turn.copy()
        stripped["assistant"], stripped["code_blocks"], stripped["executions"] = _marker(turn["assistant"]) or "", [], []
        stripped["sub_calls"], stripped["final"] = calls, _marker(turn["final"])
        stripped["parse_error"] = _marker(turn["parse_error"])
        if "feedback" in turn:
            stripped["feedback"] = _marker(turn["feedback"]) or ""
        turns.append(stripped)
    out = episode.copy()
    out["query"], out["messages"], out["turns"] = _marker(episode["query"]) or "", [], turns
    out["final"], out["error"] = _marker(episode["final"]), _marker(episode["error"])
    return out
