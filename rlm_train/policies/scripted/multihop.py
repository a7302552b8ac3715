"""Scripted strategy for multi-hop questions over many documents: unwind the question
into hops ("the birthplace of the mentor of X" -> mentor of X, then birthplace of that),
and for each hop grep the documents for the current entity and ask the sub-model about
what was found (either the matching sentences in one call, or each matching document in
a batch). When a hop finds nothing, fall back to the batched per-document search."""

from __future__ import annotations

import re

from rlm_train.policies.scripted import generic
from rlm_train.policies.scripted.view import EpisodeView, repl_block
from rlm_train.tasks.multihop import RELATIONS

_PHRASES = sorted({r["phrase"].format(s="").strip() for r in RELATIONS}, key=len, reverse=True)


def unwind(query: str) -> tuple[list[str], str] | None:
    """(hop phrases, innermost first; start entity) of "what is <phrase of ... X>?"."""
    m = re.search(r"what is (.+?)\? Answer", query)
    if not m:
        return None
    rest = m.group(1)
    hops = []
    while True:
        phrase = next((p for p in _PHRASES if rest.startswith(p + " ")), None)
        if phrase is None:
            break
        hops.append(phrase)
        rest = rest[len(phrase) + 1 :]
    if not hops:
        return None
    return hops[::-1], re.sub(r"^the ", "", rest)


def _setup_code() -> str:
    return """import re
docs = [d for d in re.split(r"\\n(?=### Document \\d+: )", context) if d.strip()]
print(len(docs), "documents")"""


def _hops_code(view: EpisodeView, hops: list[str], start: str, batched: bool) -> str:
    ask = view.rng.choice(
        [
            "Question: What is {phrase} {entity}?\nReply with the name only, or NONE if the text does not say.\n\nText:\n",
            "Using only the text below, answer: What is {phrase} {entity}? Give just the name (or NONE).\n\n",
        ]
    )
    if batched:
        search = f"""    found = [d for d in docs if name.lower() in d.lower()]
    replies = llm_query_batched([{ask!r}.format(phrase=phrase, entity=name) + d[:6000] for d in found])
    answers = [r.strip() for r in replies if r.strip() and r.strip().upper() != "NONE"]
    reply = max(set(answers), key=answers.count) if answers else "NONE\""""
    else:
        search = f"""    found = [s for d in docs if name in d for s in re.split(r"(?<=[.!?])\\s+", d) if name in s]
    reply = llm_query({ask!r}.format(phrase=phrase, entity=name) + "\\n".join(found)).strip() if found else "NONE\""""
    return f"""hops = {hops!r}
name = {start!r}
trail = [name]
for phrase in hops:
{search}
    print(f"{{phrase}} {{name}}: {{len(found)}} hits -> {{reply}}")
    if reply.upper() == "NONE":
        print("STUCK at", phrase, name)
        break
    name = re.sub(r"^(?:the|The) ", "", reply.splitlines()[0].strip().rstrip("."))
    trail.append(name)
else:
    answer = name
    print("ANSWER", answer)"""


def next_turn(view: EpisodeView) -> str:
    parsed = unwind(view.query)
    last = view.last_output
    seen = view.all_outputs
    if view.last_turn or "ANSWER" in last:
        return view.rng.choice(["The chain is complete.", "Submitting the last entity."]) + "\n" + repl_block(
            "FINAL_VAR('answer')" if "ANSWER" in seen else "FINAL(name if 'name' in globals() else 'unknown')"
        )
    if parsed is None:
        return generic.next_turn(view)
    hops, start = parsed
    if "documents" not in seen:
        intro = view.rng.choice(["Split the context into documents first.", "Let me index the documents."])
        peek = "\nprint(docs[0][:300])" if view.rng.random() < 0.5 else ""
        return f"{intro}\n{repl_block(_setup_code() + peek)}"
    if "STUCK" in last:
        return "The sentence search came up empty; asking about each matching document instead.\n" + repl_block(
            _hops_code(view, hops, start, batched=True)
        )
    batched = view.rng.random() < 0.35
    intro = view.rng.choice(
        [f"The question has {len(hops)} hops; I resolve them one at a time starting from {start}.",
         "Follow the chain: grep for each entity, ask the sub-model for the next one."]
    )
    return f"{intro}\n{repl_block(_hops_code(view, hops, start, batched))}"
