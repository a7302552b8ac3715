"""Scripted strategy for an arbitrary question over a text context: peek, grep the
query's distinctive words, ask the sub-model about the best-matching passages in one
batch, submit its answer. Used for unknown families and child RLMs."""

from __future__ import annotations

import re

from rlm_train.policies.scripted.view import EpisodeView, repl_block

_STOP = set(
    "what which who whom whose when where why how is are was were the a an of in on for to and or "
    "does do did with from by about into this that these those there their its it be been mentioned "
    "text context provided given".split()
)


def query_terms(query: str) -> list[str]:
    words = re.findall(r"[A-Za-z0-9][\w'-]*", query)
    terms = [w for w in words if w.lower() not in _STOP and len(w) > 2]
    return list(dict.fromkeys(terms))[:6]


def next_turn(view: EpisodeView) -> str:
    terms = query_terms(view.query)
    last = view.last_output
    if view.last_turn or "SUBMIT" in last:
        return "Submitting what the sub-model found.\n" + repl_block(
            "FINAL(answer if 'answer' in globals() else 'unknown')"
        )
    if view.turn == 0:
        return "A first look at the context.\n" + repl_block(
            "text = context if isinstance(context, str) else '\\n'.join(map(str, context))\n"
            "print(len(text), 'characters')\nprint(text[:500])"
        )
    return "Grep for the query's words, then ask the sub-model about the best passages.\n" + repl_block(
        f"""import re
terms = {terms!r}
query = {view.query!r}
passages = [p for p in re.split(r"\\n\\s*\\n|\\n", text) if p.strip()]
scored = sorted(passages, key=lambda p: -sum(t.lower() in p.lower() for t in terms))
best = [p for p in scored[:{view.rng.choice([4, 6, 8])}] if any(t.lower() in p.lower() for t in terms)]
print(len(best), "passages match", terms)
replies = llm_query_batched([query + "\\n" + p[:4000] for p in best]) if best else []
answers = [r for r in replies if r.strip() and r.strip() != "NOT FOUND"]
answer = answers[0] if answers else "unknown"
print("SUBMIT", answer[:300])"""
    )
