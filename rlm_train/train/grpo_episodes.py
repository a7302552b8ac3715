"""How a finished GRPO episode counts: its end (ok, over-long, infrastructure), the overlong policy,
the clock that keeps time lost to a busy server off the policy's account, and the rollout log.

One rule for every over-long episode, however it was cut:

    end         what made it                                             loss     group statistics
    ok          FINAL, or out of turns (max_iterations)                  trained  in
    overlong    rollout.max_completion_tokens hit between or within a    reward.overlong: 'mask' leaves it out of
                turn; an episode budget (sub-calls, tokens); more than   both; 'penalty' trains it with reward
                rlm.max_wall_s of the policy's own time                  -overlong_penalty
    infra       the server or sandbox failed; the hard episode timeout   masked   out (never a 0)
                reached while the time was spent waiting on the server
"""

from __future__ import annotations

import sys

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from rlm_train.records import Outcome
from rlm_train.train.grpo_config import completion_token_cap

if TYPE_CHECKING:
    from rlm_train.train.grpo_config import GRPOConfig

EpisodeEnd = Literal["ok", "overlong", "infra"]


class EpisodeClock:
    """Splits an episode's wall time into time waiting on the model (root turns, sub-calls, child RLMs:
    infrastructure, however busy the server is) and the rest (the policy's: its code in the sandbox)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.waiting_s = 0.0
        self._pending = 0
        self._since = 0.0

    def wait_begins(self) -> None:
        if self._pending == 0:
            self._since = time.monotonic()
        self._pending += 1

    def wait_ends(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.waiting_s += time.monotonic() - self._since

    def policy_s(self) -> float:
        now = time.monotonic()
        waiting = self.waiting_s + (now - self._since if self._pending else 0.0)
        return now - self.started - waiting


class TimedPolicy:
    """A sub-policy as one episode sees it: the time its calls take is model time on that episode's clock."""

    def __init__(self, inner: Any, clock: EpisodeClock):
        self.inner = inner
        self.clock = clock
        self.name = getattr(inner, "name", "sub-policy")

    async def chat(self, messages, sampling=None, call=None):
        self.clock.wait_begins()
        try:
            return await self.inner.chat(messages, sampling, call)
        finally:
            self.clock.wait_ends()

    async def aclose(self) -> None:
        return None  # the inner policy is shared by the batch and closed by it


def episode_timeout_s(cfg: GRPOConfig) -> float | None:
    """The loop's hard wall-clock cap: rollout.episode_timeout_s, else 3 x the policy's budget."""
    if cfg.rollout.episode_timeout_s is not None:
        return cfg.rollout.episode_timeout_s
    return None if cfg.rlm.max_wall_s is None else 3 * cfg.rlm.max_wall_s


def classify_episode(outcome: str, wall_s: float, cut: str | None, policy_s: float,
                     max_wall_s: float | None, timeout_s: float | None) -> EpisodeEnd:
    """The end of one episode from what the recorder and the loop saw (a pure function, tested on
    constructed episodes). `cut` is the recorder's reason when it cut the episode ('tokens' or 'wall')."""
    if cut is not None:
        return "overlong"
    if outcome == Outcome.BUDGET:
        if timeout_s is not None and wall_s >= timeout_s:
            # The hard cap: over-long only if the policy's own time alone was over its budget.
            return "overlong" if max_wall_s is not None and policy_s > max_wall_s else "infra"
        return "overlong"  # sub-call or token budget: the policy's doing
    if outcome == Outcome.ERROR:
        return "infra"
    return "ok"


def overlong_penalty(end: EpisodeEnd, length: int, cfg: GRPOConfig) -> float | None:
    """The penalty reward (reward.overlong=penalty): -overlong_penalty for an over-long episode, a linear
    share of it within overlong_buffer_tokens of the cap, 0 otherwise; None for infrastructure failures."""
    if end == "infra":
        return None
    r = cfg.reward
    if end == "overlong":
        return -r.overlong_penalty
    cap, buffer = completion_token_cap(cfg), r.overlong_buffer_tokens
    if buffer and length > cap - buffer:
        return -r.overlong_penalty * min(1.0, (length - (cap - buffer)) / buffer)
    return 0.0


def is_scored(end: EpisodeEnd, overlong: str) -> bool:
    """Whether an episode gets rewards and a loss (False: left out of the loss and of its group's statistics)."""
    return end == "ok" or (end == "overlong" and overlong == "penalty")


class RolloutLog:
    """Episodes of the current batch, written to rollouts.jsonl once their rewards are known.

    With several ranks each one holds its own episodes; `flush` (called by every rank at the same point)
    gathers them to the main process, which alone writes. `keep_below_step` trims records of steps a
    resumed run will train again."""

    def __init__(self, path: Path | None):
        self.path = path
        self.episodes: dict[str, dict[str, Any]] = {}
        self.gather: Callable[[list], list] = lambda items: items
        self.is_main = True

    def bind(self, accelerator: Any) -> None:
        from accelerate.utils import gather_object

        self.is_main = accelerator.is_main_process
        if accelerator.num_processes > 1:
            self.gather = gather_object

    def add(self, episode_id: str, record: dict[str, Any]) -> None:
        self.episodes[episode_id] = record

    def note_rewards(self, name: str, episode_ids: list[str], values: list[float | None]) -> None:
        for eid, value in zip(episode_ids, values):
            if eid in self.episodes:
                self.episodes[eid].setdefault("rewards", {})[name] = value

    def flush(self) -> None:
        records = self.gather(list(self.episodes.values()))
        self.episodes = {}
        if self.path is not None and records and self.is_main:
            from rlm_train.formats import append_jsonl

            for record in records:
                append_jsonl(self.path, record)

    def keep_below_step(self, step: int) -> int:
        """Drop records with grpo_step >= step (main process); returns how many were dropped."""
        return trim_jsonl(self.path, lambda rec: rec.get("grpo_step", 0) < step) if self.is_main else 0


def trim_jsonl(path: Path | None, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSONL file with only the records `keep` accepts (atomically); returns the number dropped."""
    import json
    import os

    if path is None or not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the kill this run resumes from: dropped, and said so
            print(f"{path}:{number}: not a JSON record (torn by an interrupted run?); dropped", file=sys.stderr)
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        tmp = path.with_name(f".{path.name}.trim-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
