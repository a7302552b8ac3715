"""Scripted strategy for needle-in-a-haystack: peek (sometimes), search for each key
with a regex (two styles), recover with a looser search when nothing matched, then
submit. The teacher only knows the query; it finds the needle by running code."""

from __future__ import annotations

import re

from rlm_train.policies.scripted import generic
from rlm_train.policies.scripted.view import EpisodeView, repl_block

_QUOTED_RE = re.compile(r"[\"“']([^\"”']{2,80})[\"”']")
_FOR_RE = re.compile(r"\bfor\s+(.+?)(?:\s+(?:mentioned|in the|that|which)\b|\?|$)", re.IGNORECASE)


def query_keys(query: str) -> list[str]:
    """The key(s) the query asks about: quoted strings, else what follows 'for'."""
    quoted = _QUOTED_RE.findall(query)
    if quoted:
        return [q.strip() for q in quoted]
    match = _FOR_RE.search(query)
    if not match:
        return []
    parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", match.group(1).strip().rstrip(".?"))
    return [p.strip() for p in parts if p.strip()]


def _peek_code(view: EpisodeView) -> str:
    return view.rng.choice(
        [
            "print(type(context).__name__, len(context))\nprint(context[:400])",
            "print(f'{len(context):,} characters')\nprint(context[:300])\nprint('...')\nprint(context[-200:])",
            "lines = context.splitlines()\nprint(len(lines), 'lines')\nfor line in lines[:5]:\n    print(line[:120])",
        ]
    )


def _search_code(keys: list[str], view: EpisodeView) -> str:
    if view.rng.random() < 0.5:
        return f"""import re
keys = {keys!r}
found = {{}}
for key in keys:
    pattern = r"magic\\s+\\w+\\s+for\\s+" + re.escape(key) + r"\\s+(?:is|are):?\\s*([\\w-]+)"
    found[key] = list(dict.fromkeys(re.findall(pattern, context)))
    print(("FOUND " + key + ": " + ", ".join(found[key])) if found[key] else ("NO MATCH " + key))"""
    return f"""import re
found = {{}}
for key in {keys!r}:
    hits = [m.start() for m in re.finditer(re.escape(key), context)]
    values = []
    for start in hits:
        window = context[start:start + len(key) + 60]
        m = re.match(re.escape(key) + r"\\s+(?:is|are):?\\s*([\\w-]+)", window)
        if m and m.group(1) not in values:
            values.append(m.group(1))
    found[key] = values
    print(key, "->", len(hits), "mentions")
    print(("FOUND " + key + ": " + ", ".join(values)) if values else ("NO MATCH " + key))"""


def _recovery_code(keys: list[str]) -> str:
    # Case-insensitive, tolerant of the words between the key and the value.
    return f"""import re
for key in {keys!r}:
    if found.get(key):
        continue
    loose = re.compile(re.escape(key).replace("\\\\ ", r"\\s+") + r"\\W{{0,5}}(?:\\w+\\W+){{0,4}}?(?:is|are|:)\\W*([\\w-]*\\d[\\w-]*)", re.IGNORECASE)
    found[key] = list(dict.fromkeys(loose.findall(context)))
    if not found[key]:
        for m in re.finditer(re.escape(key.split()[-1]), context, re.IGNORECASE):
            print("...", context[max(0, m.start() - 80):m.start() + 80].replace("\\n", " "), "...")
    print("RECOVERY", ("FOUND " + key + ": " + ", ".join(found[key])) if found[key] else ("NO MATCH " + key))"""


def _final_code(view: EpisodeView) -> str:
    if view.rng.random() < 0.5:
        return (
            "answer = ', '.join(v for vals in found.values() for v in vals) if 'found' in globals() else ''\n"
            "FINAL_VAR('answer')"
        )
    return "values = [v for vals in found.values() for v in vals] if 'found' in globals() else []\nFINAL(', '.join(values))"


def next_turn(view: EpisodeView) -> str:
    keys = query_keys(view.query)
    if not keys:
        return generic.next_turn(view)
    seen = view.all_outputs
    last = view.last_output
    if view.last_turn or "RECOVERY" in last or ("FOUND" in last and "NO MATCH" not in last):
        intro = view.rng.choice(["I have the value(s); submitting.", "The search found the needle.", "Done searching."])
        return f"{intro}\n{repl_block(_final_code(view))}"
    if "NO MATCH" in last and "RECOVERY" not in seen:
        intro = view.rng.choice(
            ["The exact pattern found nothing; trying a looser search.", "No exact hit. Let me search case-insensitively."]
        )
        return f"{intro}\n{repl_block(_recovery_code(keys))}"
    if view.turn == 0 and view.rng.random() < 0.7:
        intro = view.rng.choice(["First, a look at the context.", "Let me peek at the data.", "Start by checking the size and format."])
        return f"{intro}\n{repl_block(_peek_code(view))}"
    intro = view.rng.choice(
        [f"Searching for {', '.join(keys)}.", "Now a regex search for the key.", "Let me grep for the needle."]
    )
    return f"{intro}\n{repl_block(_search_code(keys, view))}"
