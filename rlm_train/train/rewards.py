"""GRPO rewards: pure functions of the episode fields the rollout returns, wrapped as TRL reward functions.

The task reward is the task's scorer on the episode's FINAL answer; the optional format reward
favours turns that run code and episodes that end with FINAL. Episodes that broke for reasons
outside the policy (sandbox or server trouble) get None, so TRL leaves them out of the group baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from rlm_train.errors import UserError
from rlm_train.records import Outcome

if TYPE_CHECKING:
    from rlm_train.train.grpo_config import GRPOConfig
    from rlm_train.train.grpo_rollout import RolloutLog


def task_reward_value(task: dict[str, Any], final: Any, outcome: str, infra_error: bool, scorer: Callable) -> float | None:
    """The scorer on the FINAL answer; 0 without one; None when the episode broke for reasons outside the policy."""
    if infra_error:
        return None
    if final is None:
        return 0.0
    return float(scorer(task, final))


def format_reward_value(turns: int, turns_with_code: int, outcome: str, infra_error: bool) -> float | None:
    """Half for the share of root turns that ran a ```repl block, half for ending with FINAL."""
    if infra_error:
        return None
    share = turns_with_code / turns if turns else 0.0
    return 0.5 * share + 0.5 * (1.0 if outcome == Outcome.FINAL else 0.0)


def make_reward_funcs(cfg: GRPOConfig, tasks: dict[str, dict[str, Any]], scorer: Callable, log: RolloutLog):
    """TRL reward functions (named for its logs) and their weights."""

    def task_score(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            task_reward_value(tasks[tid], final, outcome, bad, scorer)
            for tid, final, outcome, bad in zip(kw["task_id"], kw["rlm_final"], kw["rlm_outcome"], kw["rlm_infra_error"])
        ]
        log.note_rewards("task_score", kw["rlm_episode_id"], values)
        return values

    def repl_format(prompts, completions, completion_ids, **kw) -> list[float | None]:
        values = [
            format_reward_value(n, n_code, outcome, bad)
            for n, n_code, outcome, bad in zip(kw["rlm_turns"], kw["rlm_turns_with_code"], kw["rlm_outcome"],
                                               kw["rlm_infra_error"])
        ]
        log.note_rewards("repl_format", kw["rlm_episode_id"], values)
        return values

    funcs, weights = [], []
    if cfg.reward.task_weight > 0:
        funcs.append(task_score)
        weights.append(cfg.reward.task_weight)
    if cfg.reward.format_weight > 0:
        funcs.append(repl_format)
        weights.append(cfg.reward.format_weight)
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
