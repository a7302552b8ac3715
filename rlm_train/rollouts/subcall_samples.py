"""Sub-call samples for `rlm-train filter` (`sub_calls.enabled`): the sub-model's side of the
kept episodes, so ONE adapter learns to write the root's programs and to answer the
sub-calls those programs send.

A sub-call reaches the sub-policy as one user message and no system prompt
(rlm/loop.py `_llm_one`), so its sample is exactly [user: prompt, assistant: response], as
the trajectory recorded them. Only calls whose prompt and response were recorded whole
qualify: the recorder cuts a text past `rlm.record_chars` ("... [N chars not recorded]",
loop.py `_clip`) and replaces one past `rlm.trajectory_chars` by a marker (rlm/recording.py);
a clipped text is not what the sub-model saw or said. Errored calls and rlm_query answers
(a child RLM's answer, not a sub-model reply) are left out; a child RLM's own llm_query
calls count like the root's. The answers are the trajectories' `sub_policy`'s: the filter
report and the dataset card name it.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from pydantic import Field

from rlm_train.config import StrictModel
from rlm_train.records import SubCallRecord, TrajectoryRecord

if TYPE_CHECKING:
    from rlm_train.rollouts.filter import FilterConfig, Sample

ROOT_TURN = "root_turn"
SUB_CALL = "sub_call"

# The recorder's two cuts: `_clip` (record_chars) appends "... [N chars not recorded]";
# the trajectory budget (recording.py NOT_RECORDED) replaces the text by "[N chars not recorded: past ...]".
_CLIPPED_RE = re.compile(r"\.\.\. \[([\d,]+) chars not recorded\]\Z")
_NOT_RECORDED_RE = re.compile(r"\[[\d,]+ chars not recorded: past rlm\.trajectory_chars\]\Z")


class SubCallSamples(StrictModel):
    """`filter.sub_calls`: SFT samples of the sub-model's turns, beside the root turns."""

    enabled: bool = False
    """Also emit one sample per qualifying llm_query sub-call of the kept episodes: [user: the
    prompt, assistant: the reply], exactly as the sub-policy saw and gave them (no system prompt).
    Qualifying: prompt and reply recorded whole (generate with rlm.record_chars above the longest
    one), no error. Identical prompts are kept once; the split is by task, as for root turns."""
    max_per_episode: int | None = Field(None, ge=1)
    """Keep at most this many sub-call samples per episode (chosen by a hash of split_seed and
    the prompt), so episodes with many sub-calls do not crowd out the rest. None: all."""
    max_samples: int | None = Field(None, ge=0)
    """Keep at most this many sub-call samples in all (chosen by a hash of split_seed and the
    prompt, stable when trajectories are added). None: all."""


@dataclass
class SubCallCounts:
    """What happened to the sub-calls of the kept episodes (the report's `sub_calls`)."""

    recorded: int = 0  # sub-calls in the kept episodes' records, rlm_query included
    dropped: Counter[str] = field(default_factory=Counter)
    longest_text: int = 0  # longest prompt or reply seen (clipped ones at their full length)
    sub_policies: Counter[str] = field(default_factory=Counter)  # of the samples kept


def subcall_drop_reason(call: SubCallRecord) -> str | None:
    """Why a recorded sub-call is not a sample (a report key), or None."""
    if call.get("kind") != "llm":
        return "rlm_query_answer"  # a child RLM's answer; its own llm_query calls are walked separately
    if call.get("error"):
        return "error"
    prompt, response = call.get("prompt"), call.get("response")
    if prompt is None or response is None:
        return "not_recorded"
    if _NOT_RECORDED_RE.search(prompt) or _NOT_RECORDED_RE.search(response):
        return "past_trajectory_chars"
    if len(prompt) != call.get("prompt_chars", len(prompt)) or _CLIPPED_RE.search(response):
        return "clipped"
    return None


def full_length(text: str | None, recorded_chars: int | None = None) -> int:
    """A recorded text's length before `_clip` cut it."""
    if recorded_chars is not None:
        return recorded_chars
    if text is None:
        return 0
    match = _CLIPPED_RE.search(text)
    return match.start() + int(match.group(1).replace(",", "")) if match else len(text)


def iter_llm_calls(traj: TrajectoryRecord) -> Iterator[tuple[int, SubCallRecord]]:
    """(root turn index, call) for every sub-call of the episode, a child RLM's own calls
    included (under the root turn that started the child)."""
    def walk(turns, root_turn: int | None):
        for turn in turns:
            index = turn.get("index", 0) if root_turn is None else root_turn
            for call in turn.get("sub_calls") or []:
                yield index, call
                if call.get("child"):
                    yield from walk(call["child"].get("turns") or [], index)
    yield from walk(traj.get("turns") or [], None)


def subcall_samples(traj: TrajectoryRecord, config: FilterConfig, counts: SubCallCounts) -> list[Sample]:
    """One sample per qualifying sub-call of a kept episode, in the order they were made."""
    from rlm_train.rollouts.filter import Sample

    out = []
    for turn, call in iter_llm_calls(traj):
        counts.recorded += 1
        counts.longest_text = max(counts.longest_text, full_length(call.get("prompt"), call.get("prompt_chars")),
                                  full_length(call.get("response")))
        reason = subcall_drop_reason(call)
        prompt, response = call.get("prompt") or "", call.get("response") or ""
        if reason is None and len(response) > config.max_turn_chars:
            reason = "turn_too_long"
        if reason is None and len(prompt) + len(response) > config.max_sample_chars:
            reason = "sample_too_long"
        if reason:
            counts.dropped[reason] += 1
            continue
        out.append(Sample(
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            task_id=traj["task_id"], family=traj.get("family"), sample=traj.get("sample"), turn=turn,
            num_turns=len(traj["turns"]), score=traj.get("score"), trajectory_id=traj.get("id"),
            policy=traj.get("policy"), kind=SUB_CALL, sub_policy=traj.get("sub_policy"),
        ))
    return out


def _rank(seed: int, prompt: str) -> str:
    return hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()


def select_subcall_samples(samples: list[Sample], config: FilterConfig, counts: SubCallCounts) -> list[Sample]:
    """Dedupe by prompt (the first reply kept), then the per-episode and total caps, each
    keeping the samples whose hash(split_seed, prompt) is smallest; the order stays as made."""
    seen: set[str] = set()
    unique = []
    for s in samples:
        prompt = s.messages[0]["content"]
        if prompt in seen:
            counts.dropped["duplicate_prompt"] += 1
            continue
        seen.add(prompt)
        unique.append(s)
    sub = config.sub_calls
    keep = unique
    if sub.max_per_episode is not None:
        by_episode: dict[str | None, list[Sample]] = defaultdict(list)
        for s in keep:
            by_episode[s.trajectory_id].append(s)
        chosen = {id(s) for group in by_episode.values()
                  for s in sorted(group, key=lambda s: _rank(config.split_seed, s.messages[0]["content"]))[: sub.max_per_episode]}
        counts.dropped["over_max_per_episode"] += len(keep) - len(chosen)
        keep = [s for s in keep if id(s) in chosen]
    if sub.max_samples is not None and len(keep) > sub.max_samples:
        ranked = sorted(keep, key=lambda s: _rank(config.split_seed, s.messages[0]["content"]))
        chosen = {id(s) for s in ranked[: sub.max_samples]}
        counts.dropped["over_max_samples"] += len(keep) - len(chosen)
        keep = [s for s in keep if id(s) in chosen]
    counts.dropped = Counter({k: n for k, n in counts.dropped.items() if n})
    counts.sub_policies.update(str(s.sub_policy) for s in keep)
    return keep


def no_subcall_samples(sources: list[str], kept_episodes: int, counts: SubCallCounts) -> str:
    """The one-line refusal when sub_calls.enabled finds nothing to emit."""
    seen = counts.recorded - counts.dropped.get("rlm_query_answer", 0)
    clipped = counts.dropped.get("clipped", 0) + counts.dropped.get("past_trajectory_chars", 0)
    errored = counts.dropped.get("error", 0)
    head = (f"{', '.join(sources)}: sub_calls.enabled, but the {kept_episodes} kept episodes recorded no usable "
            f"llm_query sub-call ({seen} seen, {clipped} clipped, {errored} errored")
    others = ", ".join(f"{reason} {n}" for reason, n in counts.dropped.most_common()
                       if reason not in ("clipped", "past_trajectory_chars", "error"))
    head += f"; {others})" if others else ")"
    if seen == 0:
        return f"{head}; the episodes made no sub-calls: generate with a policy whose programs call llm_query, or set sub_calls.enabled=false"
    if clipped and clipped + errored == seen:
        return (f"{head}; the recorder clipped them: re-run `rlm-train generate` with rlm.record_chars="
                f"{counts.longest_text} or more (the longest sub-call text; rlm.trajectory_chars must hold them too)")
    return f"{head}; see the reasons above, or set sub_calls.enabled=false"
