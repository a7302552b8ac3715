"""Scripted strategy for OOLONG-Pairs: classify every record with batched sub-calls
(as for oolong), build per-user statistics in code, turn the query's predicate into a
Python test, enumerate the user pairs and submit them one per line."""

from __future__ import annotations

import datetime as dt
import re

from rlm_train.policies.scripted import oolong as oolong_strategy
from rlm_train.policies.scripted.view import EpisodeView, repl_block
from rlm_train.tasks.pairs import TEMPLATES

_SLOTS = {"A": r"(?P<A>\w+)", "B": r"(?P<B>\w+)", "k": r"(?P<k>\d+)", "k2": r"(?P<k2>\d+)",
          "year": r"(?P<year>\d{4})", "date_text": r"(?P<date_text>[A-Z][a-z]{2} \d{2}, \d{4})"}


def _template_regex(text: str) -> re.Pattern:
    out, seen = "", set()
    for part in re.split(r"(\{\w+\})", text):
        slot = part[1:-1] if part.startswith("{") else None
        if slot in _SLOTS:
            out += f"(?P={slot})" if slot in seen else _SLOTS[slot]
            seen.add(slot)
        else:
            out += re.escape(part)
    return re.compile(out)


def parse_predicate(query: str) -> tuple[dict, dict] | None:
    """(template, params) whose text the query states, reading the parameters back."""
    for template in TEMPLATES:
        m = _template_regex(template["text"]).search(query)
        if m:
            params = {k: v for k, v in m.groupdict().items() if v is not None}
            for key in ("k", "k2", "year"):
                if key in params:
                    params[key] = int(params[key])
            if "date_text" in params:
                params["date"] = dt.datetime.strptime(params.pop("date_text"), "%b %d, %Y").date().isoformat()
            return template, params
    return None


STATS_CODE = """import datetime
from collections import Counter, defaultdict
rows = defaultdict(list)
for (date, user, text), label in zip(records, pred):
    rows[user].append((datetime.datetime.strptime(date, '%b %d, %Y').date(), label))
stats = {}
for user, items in rows.items():
    c = defaultdict(int, Counter(label for _, label in items))
    top = Counter(label for _, label in items).most_common(2)
    items.sort()
    years, first_date = defaultdict(set), {}
    for day, label in items:
        years[label].add(day.year)
        first_date.setdefault(label, day.isoformat())
    tie = len(items) > 1 and items[0][0] == items[1][0]
    stats[user] = dict(c=c, n=len(items), labels=set(c), years=years, first_date=first_date,
                       mode=top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None,
                       earliest=None if tie else items[0][1])
print(len(stats), "users")"""


def pairs_code(template: dict, params: dict) -> str:
    """Code that sets `pairs` (sorted (a, b) with a < b) for the predicate."""
    def test(expr: str) -> str:
        # The condition with its parameters written in, over one user's statistics.
        body = re.sub(r"\b(A|B|k2|k|year|date)\b", lambda m: repr(params[m.group(1)]), expr)
        body = re.sub(r"\b(c|n|labels|mode|years|first_date|earliest)\b(?!')", r"s['\1']", body)
        return f"lambda s: {body}"

    kind = template["kind"]
    lines = [STATS_CODE, "import itertools"]
    if kind == "both":
        lines.append(f"test = {test(template['expr'])}")
        lines.append("chosen = sorted(u for u, s in stats.items() if test(s))")
        lines.append("pairs = list(itertools.combinations(chosen, 2))")
    elif kind == "cross":
        lines.append(f"left = {{u for u, s in stats.items() if ({test(template['expr'])})(s)}}")
        lines.append(f"right = {{u for u, s in stats.items() if ({test(template['expr2'])})(s)}}")
        lines.append("pairs = sorted({(min(a, b), max(a, b)) for a in left for b in right if a != b})")
    elif kind == "equal":
        lines.append(f"key = {test(template['expr'])}")
        lines.append("groups = defaultdict(list)")
        lines.append("for u, s in sorted(stats.items()):\n    v = key(s)\n    if v is not None:\n        groups[v].append(u)")
        lines.append("pairs = sorted(p for g in groups.values() for p in itertools.combinations(sorted(g), 2))")
    else:  # sum
        lines.append(f"value = {test(template['expr'])}")
        lines.append("vals = {u: value(s) for u, s in stats.items() if value(s) >= 1}")
        lines.append(f"pairs = sorted((a, b) for a, b in itertools.combinations(sorted(vals), 2) if vals[a] + vals[b] == {params.get('k')!r})")
    lines.append("answer = '\\n'.join(f'({a}, {b})' for a, b in pairs)")
    lines.append("print('PAIRS', len(pairs), pairs[:5])")
    return "\n".join(lines)


def next_turn(view: EpisodeView) -> str:
    labels = oolong_strategy.query_labels(view.query)
    last = view.last_output
    seen = view.all_outputs
    if view.last_turn or "PAIRS" in last:
        return view.rng.choice(["Submitting the pairs.", "The pair list is ready."]) + "\n" + repl_block("FINAL_VAR('answer')")
    if view.turn == 0 and view.rng.random() < 0.7:
        return "First, the record format.\n" + repl_block(oolong_strategy.peek_code(view))
    if "records parsed" not in seen:
        intro = view.rng.choice(
            ["Every record needs its topic before users can be compared; classifying in batches.",
             "I classify all instances with batched sub-calls, then pair users in code."]
        )
        return f"{intro}\n{repl_block(oolong_strategy.classify_code(view, labels))}"
    unlabeled = re.findall(r"(\d+) unlabeled", last)
    if unlabeled and unlabeled[-1] != "0" and "after retry" not in last:
        return "Some batch replies did not line up; re-asking those one at a time.\n" + repl_block(
            oolong_strategy.retry_code(view)
        )
    parsed = parse_predicate(view.query)
    if parsed is None:
        return "I cannot read the condition; submitting no pairs.\n" + repl_block("answer = ''\nFINAL_VAR('answer')")
    template, params = parsed
    intro = view.rng.choice(["Per-user statistics, then the pair condition in code.", "Now test every pair of users."])
    return f"{intro}\n{repl_block(pairs_code(template, params))}"
