"""The RLM loop: prompts, code-block parsing, budgets, recursion, FINAL handling."""

from rlm_train.rlm.budget import Budget, BudgetExhausted
from rlm_train.rlm.loop import RLMConfig, run_episode, run_episode_sync

__all__ = ["Budget", "BudgetExhausted", "RLMConfig", "run_episode", "run_episode_sync"]
