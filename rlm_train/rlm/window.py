"""How large the model server's window (vLLM `--max-model-len`) must be for an RLMConfig.

Every request an episode sends must fit the window with its max tokens, or the server
answers 400: the root conversation at its longest (system prompt, query, every turn with
its REPL feedback, the answer-now turn), and one sub-call at its longest
(`sub_model_chars` of prompt plus `sub_max_tokens`). Whatever starts a vLLM server for
RLM episodes sizes the window from this, rather than from a fixed margin: `rlm-train serve
--gateway` for its gateway, GRPO's `--vllm-command` for its rollouts, and a pipeline for its
background servers from the stages that talk to them (`pipeline/chain.py: fit_server_windows`).

    tokens = server_window_tokens(RLMConfig(), chars_per_token=3.0)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rlm_train.rlm import prompts

if TYPE_CHECKING:
    from rlm_train.rlm.loop import RLMConfig

# Text is about 4 characters a token for English with the tokenizers in use; 3 leaves room
# for code, numbers and other scripts, which tokenize denser.
CHARS_PER_TOKEN = 3.0
QUERY_TOKENS = 1024  # room for the query and the context description in the first user message
MESSAGE_TOKENS = 16  # chat-template tokens around each message


def root_tokens(config: RLMConfig, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The longest root (or child RLM) conversation plus its last turn's max tokens."""
    system = math.ceil(len(prompts.system_prompt(config.prompt_style, "", config.sub_model_chars)) / chars_per_token)
    feedback = math.ceil(config.feedback_chars / chars_per_token) + 2 * MESSAGE_TOKENS
    turns = config.max_iterations * (config.root_max_tokens + feedback)
    answer_now = math.ceil(len(prompts.ANSWER_NOW_PROMPT) / chars_per_token) + MESSAGE_TOKENS
    last = config.answer_max_tokens or config.root_max_tokens
    return system + QUERY_TOKENS + turns + answer_now + last + 2 * MESSAGE_TOKENS


def sub_call_tokens(config: RLMConfig, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The longest sub-call the loop sends (a longer prompt is refused) plus its max tokens."""
    return math.ceil(config.sub_model_chars / chars_per_token) + MESSAGE_TOKENS + config.sub_max_tokens


def direct_tokens(config: RLMConfig, context_chars: int, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The one request of a context-in-prompt baseline (eval's `direct: true`): up to
    `context_chars` of context with the query, and the root turn's max tokens for the reply."""
    return math.ceil(context_chars / chars_per_token) + QUERY_TOKENS + 2 * MESSAGE_TOKENS + config.root_max_tokens


def rounded(tokens: int) -> int:
    """A window of at least `tokens`, rounded up to a multiple of 256."""
    return -(-tokens // 256) * 256


def server_window_tokens(config: RLMConfig, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The window every request of an episode fits in (rounded up to a multiple of 256)."""
    return rounded(max(root_tokens(config, chars_per_token), sub_call_tokens(config, chars_per_token)))
