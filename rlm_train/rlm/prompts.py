"""The RLM's prompts, in our own words. Two variants: `full` for capable models and
`compact` for small ones (short, one example, no literal placeholder answers that a
base model could echo back as its answer)."""

from __future__ import annotations

from typing import Any

from rlm_train.records import ExecutionRecord
from rlm_train.repl.child_context import describe_context

FULL_SYSTEM_PROMPT = """\
You answer a query about a context that is too large to read directly. The context \
is stored in a Python REPL as the variable `context`; you never see it unless your \
code prints part of it. Work by writing Python code, reading what it prints, and \
writing more code, until you can answer.

The REPL keeps its variables between turns and provides:
- `context`: the data ({context_type}).
- `llm_query(prompt)`: asks a sub-model and returns its reply as a string. The \
sub-model can read about {sub_model_chars:,} characters at once, so give it a chunk \
of the context plus a precise instruction.
- `llm_query_batched(prompts)`: the same for a list of prompts, run in parallel; \
returns a list of replies in the same order. Prefer it to a loop of llm_query calls.
- `rlm_query(prompt, context=None)`: hands a sub-problem to a child RLM that gets \
its own REPL with `context` set to the object you pass. Use it when the sub-problem \
itself needs code.
- `SHOW_VARS()`: lists the variables you have defined.
- `FINAL(value)`: submits your answer and ends the task. `FINAL_VAR(name)` submits \
the value of the variable with that name (pass the name as a string).

To run code, write it in a fenced block that starts with ```repl and ends with ```. \
Only the output your code prints comes back to you, and long output is cut, so \
print summaries, counts and short slices, not whole chunks.

A good approach: look at the start of the context and its size; search it with \
string methods or regular expressions; when the answer needs understanding rather \
than matching, split the context into chunks and ask the sub-model about each chunk \
with llm_query_batched, then combine the replies in code. Check your result before \
you submit it. When you are sure, call FINAL or FINAL_VAR inside a ```repl block.\
"""

COMPACT_SYSTEM_PROMPT = """\
The data for the question is in the Python variable `context` ({context_type}). \
Write Python in a ```repl block to inspect it; you will see what it prints. \
Helpers: llm_query(prompt) and llm_query_batched(prompts) ask a sub-model; \
rlm_query(prompt, context) asks a child RLM. Submit with FINAL(value) or \
FINAL_VAR("variable_name") inside a ```repl block.\
"""

FIRST_USER_PROMPT = """\
Query: {query}

The context is {context_description}. Start by writing code in a ```repl block.\
"""

NO_CODE_FEEDBACK = (
    "Your reply had no ```repl code block and no FINAL answer. Write Python code in a "
    "```repl block to inspect `context`, or submit with FINAL(...)."
)

ANSWER_NOW_PROMPT = (
    "You have used all your turns. Give your final answer now: one ```repl block that "
    "calls FINAL(...) or FINAL_VAR(...) with your best answer."
)


def system_prompt(style: str, context: Any, sub_model_chars: int) -> str:
    context_type, _ = describe_context(context)
    template = COMPACT_SYSTEM_PROMPT if style == "compact" else FULL_SYSTEM_PROMPT
    return template.format(context_type=context_type, sub_model_chars=sub_model_chars)


def first_user_prompt(query: str, context: Any) -> str:
    _, description = describe_context(context)
    return FIRST_USER_PROMPT.format(query=query, context_description=description)


def execution_feedback(results: list[ExecutionRecord], max_chars: int) -> str:
    """What the model sees after its code ran: each block's output, cut to max_chars in all."""
    parts = []
    per_block = max(200, max_chars // max(1, len(results)))
    for i, res in enumerate(results, 1):
        text = (res.get("stdout") or "") + (res.get("stderr") or "")
        error = res.get("error")
        if error:
            text += ("" if not text or text.endswith("\n") else "\n") + error
        if not text.strip():
            text = "(no output)"
        if len(text) > per_block:
            cut = len(text) - per_block
            text = text[:per_block] + f"\n... [{cut:,} more characters cut]"
        header = "REPL output:" if len(results) == 1 else f"REPL output (block {i}):"
        parts.append(f"{header}\n{text.rstrip()}")
    return "\n\n".join(parts)
