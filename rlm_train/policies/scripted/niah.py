"""Scripted strategy for needle-in-a-haystack: peek (sometimes), search for each key
(three styles: one regex, a find loop over windows, matching sentences), check the hit
in its sentence (sometimes), recover with a looser search when nothing matched or the
code failed, then submit. The teacher only knows the query; it finds the needle by
running code, and its search keys on the key, not on the needle's wording."""

from __future__ import annotations

import re

from rlm_train.policies.scripted import generic
from rlm_train.policies.scripted.view import EpisodeView, double_quoted, repl_block

_KEY_RE = re.compile(r"\b[a-z]+-[a-z]+\b")
_QUOTED_RE = re.compile(r"[\"“']([^\"”']{2,80})[\"”']")
_FOR_RE = re.compile(r"\bfor\s+(.+?)(?:\s+(?:mentioned|in the|that|which)\b|\?|$)", re.IGNORECASE)


def query_keys(query: str) -> list[str]:
    """The key(s) the query asks about: hyphenated adjective-noun keys, else quoted strings,
    else what follows 'for'. The wording around the key does not matter."""
    keys = list(dict.fromkeys(_KEY_RE.findall(query)))
    if keys:
        return keys
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


def _keys_code(view: EpisodeView, keys: list[str]) -> str:
    """The line(s) that set `keys`. Where the keys are hyphenated words, the program copies
    the question and reads them with a regex: copying a sentence is easier for a small
    model than spelling a key it has never seen, and the same code serves any wording."""
    if _KEY_RE.findall(view.query):
        return f"question = {double_quoted(view.query)}\nkeys = list(dict.fromkeys(re.findall(r\"{_KEY_RE.pattern}\", question)))"
    return f"keys = {keys!r}"


def _search_code(keys: list[str], view: EpisodeView) -> str:
    """Three ways to find the number(s) written after a key, whatever the sentence says.
    `\\b` after the key keeps `quiet-harbour` from matching `quiet-harbor`."""
    style = view.rng.randrange(3)
    head = f"import re\n{_keys_code(view, keys)}"
    if style == 0:
        return f"""{head}
found = {{}}
for key in keys:
    found[key] = list(dict.fromkeys(re.findall(re.escape(key) + r"\\b\\D{{0,60}}?(\\d+)", context)))
    print(("FOUND " + key + ": " + ", ".join(found[key])) if found[key] else ("NO MATCH " + key))"""
    if style == 1:
        return f"""{head}
found = {{}}
for key in keys:
    values = []
    start = context.find(key)
    while start != -1:
        window = context[start:start + len(key) + 80]
        m = re.match(re.escape(key) + r"\\b\\D{{0,60}}?(\\d+)", window)
        if m and m.group(1) not in values:
            values.append(m.group(1))
        start = context.find(key, start + 1)
    found[key] = values
    print(("FOUND " + key + ": " + ", ".join(values)) if values else ("NO MATCH " + key))"""
    return f"""{head}
sentences = re.split(r"(?<=[.!?])\\s+", context)
print(len(sentences), "sentences")
found = {{}}
for key in keys:
    hits = [s for s in sentences if re.search(re.escape(key) + r"\\b", s)]
    for s in hits[:5]:
        print(">", s[:200])
    found[key] = list(dict.fromkeys(n for s in hits for n in re.findall(re.escape(key) + r"\\b\\D{{0,60}}?(\\d+)", s)))
    print(("FOUND " + key + ": " + ", ".join(found[key])) if found[key] else ("NO MATCH " + key))"""


def _verify_code() -> str:
    # A second look at each hit in its sentence before answering (`keys` is the search's).
    return """import re
for key in keys:
    for m in re.finditer(re.escape(key) + r"\\b", context):
        print("CHECK", context[max(0, m.start() - 60):m.end() + 60].replace("\\n", " "))"""


def _recovery_code(view: EpisodeView, keys: list[str]) -> str:
    # Case-insensitive, any separator between the key's words, and a wider window.
    return f"""import re
{_keys_code(view, keys)}
found = globals().get("found") or {{}}
for key in keys:
    if found.get(key):
        continue
    loose = r"[\\s_-]*".join(re.escape(part) for part in re.split(r"[\\s_-]+", key))
    found[key] = list(dict.fromkeys(re.findall(loose + r"\\b\\D{{0,100}}?(\\d+)", context, re.IGNORECASE)))
    if not found[key]:
        for m in re.finditer(re.escape(key.split("-")[-1]), context, re.IGNORECASE):
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
    found_all = "FOUND" in last and "NO MATCH" not in last
    if found_all and "CHECK" not in seen and not view.last_turn and view.rng.random() < 0.3:
        intro = view.rng.choice(["Found it; let me check the sentence before answering.", "A quick check of each hit."])
        return f"{intro}\n{repl_block(_verify_code())}"
    if view.last_turn or "RECOVERY" in last or "CHECK" in last or found_all:
        intro = view.rng.choice(["I have the value(s); submitting.", "The search found the needle.", "Done searching."])
        return f"{intro}\n{repl_block(_final_code(view))}"
    if ("NO MATCH" in last or "Error" in last) and "RECOVERY" not in seen:
        intro = view.rng.choice(
            ["The exact pattern found nothing; trying a looser search.", "No exact hit. Let me search case-insensitively."]
        )
        return f"{intro}\n{repl_block(_recovery_code(view, keys))}"
    if view.turn == 0 and view.rng.random() < 0.1:
        intro = view.rng.choice(["First, a look at the context.", "Let me peek at the data.", "Start by checking the size and format."])
        return f"{intro}\n{repl_block(_peek_code(view))}"
    intro = view.rng.choice(
        [f"Searching for {', '.join(keys)}.", "Now a regex search for the key.", "Let me grep for the needle."]
    )
    return f"{intro}\n{repl_block(_search_code(keys, view))}"
