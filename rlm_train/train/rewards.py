"""GRPO rewards: pure functions of the episode fields the rollout returns, wrapped as TRL reward functions.

The task reward is the task's scorer on the episode's FINAL answer; the optional format reward
favours turns that run code and episodes that end with FINAL. An episode that is not scored
(an infrastructure failure, or over-long under reward.overlong=mask: see grpo_episodes) gets None
from every function, so TRL leaves it out of its group's baseline and gives it advantage 0.
With reward.overlong=penalty an `overlong` reward function adds the length penalty."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from rlm_train.errors import UserError
from rlm_train.records import Outcome
from rlm_train.train.grpo_episodes import is_scored, overlong_penalty

if TYPE_CHECKING:
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.grpo_episodes import RolloutLog


def task_reward_value(task: dict[str, Any], final: Any, scored: bool, scorer: Callable) -> float | None:
    """The scorer on the FINAL answer; 0 without one; None when the episode is not scored."""
    if not scored:
        return None
    if final is None:
        return 0.0
    return float(scorer(task, final))


def format_reward_value(turns: int, turns_with_code: int, outcome: str, scored: bool) -> float | None:
    """Half for the share of root turns that ran a ```repl block, half for ending with FINAL."""
    if not scored:
        return None
    share = turns_with_code / turns if turns else 0.0
    return 0.5 * share + 0.5 * (1.0 if outcome == Outcome.FINAL else 0.0)


def make_reward_funcs(cfg: GRPOConfig, tasks: dict[str, dict[str, Any]], scorer: Callable, log: RolloutLog):
    """TRL reward functions (named for its logs) and their weights."""
    mode = cfg.reward.overlong

    def task_score(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            task_reward_value(tasks[tid], final, is_scored(end, mode), scorer)
            for tid, final, end in zip(kw["task_id"], kw["rlm_final"], kw["rlm_end"])
        ]
        log.note_rewards("task_score", kw["rlm_episode_id"], values)
        return values

    def repl_format(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            format_reward_value(n, n_code, outcome, is_scored(end, mode))
            for n, n_code, outcome, end in zip(kw["rlm_turns"], kw["rlm_turns_with_code"], kw["rlm_outcome"],
                                               kw["rlm_end"])
        ]
        log.note_rewards("repl_format", kw["rlm_episode_id"], values)
        return values

    def overlong(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [overlong_penalty(end, length, cfg) for end, length in zip(kw["rlm_end"], kw["rlm_length"])]
        log.note_rewards("overlong", kw["rlm_episode_id"], values)
        return values

    funcs, weights = [], []
    if cfg.reward.task_weight > 0:
        funcs.append(task_score)
        weights.append(cfg.reward.task_weight)
    if cfg.reward.format_weight > 0:
        funcs.append(repl_format)
        weights.append(cfg.reward.format_weight)
    if mode == "penalty" and cfg.reward.overlong_penalty > 0:
        funcs.append(overlong)
        weights.append(1.0)
    return funcs, weights


def load_task_scorer() -> Callable:
    try:
        from rlm_train.tasks import score
    except ImportError:
        try:
            from rlm_train.tasks.registry import score
        except ImportError:
            raise UserError("the task scorer (rlm_train.tasks.score) is not available in this version") from None
    return score
