"""The gateway's Prometheus-style counters, and token usage summed over a call tree."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from rlm_train.records import EpisodeRecord, TrajectoryRecord
from rlm_train.rlm.budget import SandboxSlots
from rlm_train.serve.config import GatewayConfig

if TYPE_CHECKING:
    from rlm_train.serve.gateway_body import ReadingBudget

# Request budgets capped by the server's RLMConfig (a request may lower them, never raise them).

# ---------------------------------------------------------------------------
# Metrics


_EPISODE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.rejected: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.turns = 0
        self.sub_calls = 0
        self.started = 0
        self.peak_running = 0
        self.buckets = [0] * (len(_EPISODE_BUCKETS) + 1)
        self.seconds_sum = 0.0

    def episode(self, record: TrajectoryRecord, seconds: float) -> None:
        usage = tree_usage(record)
        self.outcomes[str(record["outcome"])] += 1
        self.tokens["prompt"] += usage["prompt_tokens"]
        self.tokens["completion"] += usage["completion_tokens"]
        self.turns += record["stats"]["turns"]
        self.sub_calls += record["stats"]["sub_calls"]
        self.seconds_sum += seconds
        for i, bound in enumerate(_EPISODE_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.buckets[-1] += 1

    def render(self, running: int, queued: int, config: GatewayConfig, sandboxes: SandboxSlots,
               reading: "ReadingBudget") -> str:
        lines = [
            "# HELP rlm_gateway_requests_total HTTP requests answered, by endpoint and status.",
            "# TYPE rlm_gateway_requests_total counter",
            *(f'rlm_gateway_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())),
            "# HELP rlm_gateway_rejected_total Requests refused before an episode started, by reason.",
            "# TYPE rlm_gateway_rejected_total counter",
            *(f'rlm_gateway_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())),
            "# HELP rlm_gateway_reading_bytes Bytes reserved now by request bodies being read (before admission).",
            "# TYPE rlm_gateway_reading_bytes gauge",
            f"rlm_gateway_reading_bytes {reading.reserved}",
            "# HELP rlm_gateway_reading_bytes_max Most bytes reserved by bodies being read at once so far.",
            "# TYPE rlm_gateway_reading_bytes_max gauge",
            f"rlm_gateway_reading_bytes_max {reading.peak}",
            "# HELP rlm_gateway_max_reading_bytes Bytes of bodies allowed to be read at once.",
            "# TYPE rlm_gateway_max_reading_bytes gauge",
            f"rlm_gateway_max_reading_bytes {reading.limit}",
            "# HELP rlm_gateway_episodes_started_total Episodes started.",
            "# TYPE rlm_gateway_episodes_started_total counter",
            f"rlm_gateway_episodes_started_total {self.started}",
            "# HELP rlm_gateway_episodes_total Episodes finished, by outcome.",
            "# TYPE rlm_gateway_episodes_total counter",
            *(f'rlm_gateway_episodes_total{{outcome="{o}"}} {n}' for o, n in sorted(self.outcomes.items())),
            "# HELP rlm_gateway_episodes_running Episodes running now.",
            "# TYPE rlm_gateway_episodes_running gauge",
            f"rlm_gateway_episodes_running {running}",
            "# HELP rlm_gateway_episodes_running_max Most episodes running at once so far.",
            "# TYPE rlm_gateway_episodes_running_max gauge",
            f"rlm_gateway_episodes_running_max {self.peak_running}",
            "# HELP rlm_gateway_episodes_queued Episodes waiting for a slot now.",
            "# TYPE rlm_gateway_episodes_queued gauge",
            f"rlm_gateway_episodes_queued {queued}",
            "# HELP rlm_gateway_max_concurrent Episodes allowed to run at once.",
            "# TYPE rlm_gateway_max_concurrent gauge",
            f"rlm_gateway_max_concurrent {config.max_concurrent}",
            "# HELP rlm_gateway_max_queue Episodes allowed to wait.",
            "# TYPE rlm_gateway_max_queue gauge",
            f"rlm_gateway_max_queue {config.max_queue}",
            "# HELP rlm_gateway_sandboxes REPL sandboxes held now (episodes and child RLMs, until their worker is gone).",
            "# TYPE rlm_gateway_sandboxes gauge",
            f"rlm_gateway_sandboxes {sandboxes.held}",
            "# HELP rlm_gateway_sandboxes_max Most sandboxes held at once so far.",
            "# TYPE rlm_gateway_sandboxes_max gauge",
            f"rlm_gateway_sandboxes_max {sandboxes.peak}",
            "# HELP rlm_gateway_max_sandboxes Sandboxes allowed at once.",
            "# TYPE rlm_gateway_max_sandboxes gauge",
            f"rlm_gateway_max_sandboxes {config.max_sandboxes}",
            "# HELP rlm_gateway_tokens_total Model tokens used by finished episodes (whole call tree).",
            "# TYPE rlm_gateway_tokens_total counter",
            *(f'rlm_gateway_tokens_total{{kind="{k}"}} {n}' for k, n in sorted(self.tokens.items())),
            "# HELP rlm_gateway_turns_total Root turns of finished episodes.",
            "# TYPE rlm_gateway_turns_total counter",
            f"rlm_gateway_turns_total {self.turns}",
            "# HELP rlm_gateway_sub_calls_total Sub-calls of finished episodes.",
            "# TYPE rlm_gateway_sub_calls_total counter",
            f"rlm_gateway_sub_calls_total {self.sub_calls}",
            "# HELP rlm_gateway_episode_seconds Wall time of finished episodes, queueing excluded.",
            "# TYPE rlm_gateway_episode_seconds histogram",
            *(f'rlm_gateway_episode_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(_EPISODE_BUCKETS, self.buckets)),
            f'rlm_gateway_episode_seconds_bucket{{le="+Inf"}} {self.buckets[-1]}',
            f"rlm_gateway_episode_seconds_sum {self.seconds_sum:.4f}",
            f"rlm_gateway_episode_seconds_count {self.buckets[-1]}",
        ]
        return "\n".join(lines) + "\n"


def tree_usage(episode: EpisodeRecord) -> dict[str, int]:
    """Prompt and completion tokens of an episode's whole call tree (root turns, sub-calls, children)."""
    prompt = completion = 0
    for turn in episode["turns"]:
        prompt += turn["prompt_tokens"]
        completion += turn["completion_tokens"]
        for call in turn["sub_calls"]:
            prompt += call["prompt_tokens"]
            completion += call["completion_tokens"]
            if "child" in call:
                child = tree_usage(call["child"])
                prompt += child["prompt_tokens"]
                completion += child["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
