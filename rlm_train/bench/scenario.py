"""The one scenario the runtime and generate benches (and tests/test_generate.py) play
against the local mock server: an RLM episode of three root turns.

    turn 0  peek:    print(len(context)); print(context[:200])
    turn 1  fan out: cut the context into N pieces, llm_query_batched over them (N sub-calls)
    turn 2  answer:  FINAL of the key the context states ("The answer is: KEY.")

Root conversations (they carry a system prompt) get the turn their number of assistant
messages says; sub-calls get a short answer. One episode is therefore 4 sequential model
latencies (3 root calls + one round of parallel sub-calls). The runtime bench cuts a 1 MB
context into 32 pieces; generate runs 200 small tasks with 8 each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

ROOT_TURNS = 3
SUB_CALLS = 8  # the default fan-out (generate bench, tests)
RUNTIME_SUB_CALLS = 32
SUB_CALL_REPLY = "a short summary"
ANSWER_EXPR = r"re.search(r'answer is: (\w+)', context).group(1)"


def final_call(expr: str) -> str:
    """How our loop ends an episode."""
    return f"FINAL({expr})"


def rlms_answer(expr: str) -> str:
    """How the reference library `rlms` ends one."""
    return f'answer["content"] = {expr}\nanswer["ready"] = True'


def turn_code(turn: int, sub_calls: int = SUB_CALLS, finish: Callable[[str], str] = final_call) -> str:
    """The code of root turn `turn` (0, 1, then the answer for any later turn)."""
    if turn == 0:
        return "print(len(context))\nprint(context[:200])"
    if turn == 1:
        return (f"size = len(context) // {sub_calls} + 1\n"
                f"pieces = [context[i * size:(i + 1) * size] for i in range({sub_calls})]\n"
                "replies = llm_query_batched(['Summarize in one sentence: ' + p[:2000] for p in pieces])\n"
                "print(len(replies), replies[0][:40])")
    return "import re\n" + finish(ANSWER_EXPR)


def make_responder(sub_calls: int = SUB_CALLS, finish: Callable[[str], str] = final_call):
    """A mock server responder(messages, body) -> str that plays the scenario."""

    def respond(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        if not any(m.get("role") == "system" for m in messages):
            return SUB_CALL_REPLY
        turn = sum(1 for m in messages if m.get("role") == "assistant")
        return "```repl\n" + turn_code(turn, sub_calls, finish) + "\n```"

    return respond


# Importable by name (MODULE:NAME), so a mock server in its own process can run them.
scenario_responder = make_responder()
runtime_responder = make_responder(RUNTIME_SUB_CALLS)
rlms_runtime_responder = make_responder(RUNTIME_SUB_CALLS, rlms_answer)


def scenario_context(key: str, filler: str, chars: int) -> str:
    """About `chars` characters of `filler` with "The answer is: KEY." in the middle."""
    half = filler * (chars // (2 * len(filler)) + 1)
    half = half[:max(0, chars // 2 - 12)]
    return f"{half}The answer is: {key}. {half}"


def write_scenario_tasks(path: Path, n: int) -> None:
    """n small tasks (ids bench-0..) whose context states the answer keyI: the scenario's
    answer turn (and the scripted teacher) finds it."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for i in range(n):
            context = scenario_context(f"key{i}", f"Filler sentence number {i}. ", 1600)
            fh.write(json.dumps({
                "schema": "rlm-train/task/v1", "id": f"bench-{i}", "family": "niah",
                "query": "What is the answer?", "context": context, "answer": [f"key{i}"],
                "scorer": "all_strings", "meta": {"seed": i},
            }) + "\n")
