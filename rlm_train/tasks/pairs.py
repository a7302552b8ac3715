"""`pairs`: OOLONG-Pairs style. Over OOLONG records, list every pair of user ids whose
classified instances satisfy a predicate. Quadratic in users, so the answer needs every
record classified (batched sub-calls) and the pairing done in code.

The predicates are data: each template has the English text the query shows and the
Python expression that decides it over one user's statistics (names below). The same
expression computes the ground truth here and is what a solver writes in the REPL.

Per-user names an expression may use:
  c[label]    number of the user's instances with that label (0 when none)
  n           the user's number of instances
  labels      set of labels among them
  mode        the label strictly more common than every other for the user, else None
  years[label]       set of years (int) of the user's instances with that label
  first_date[label]  ISO date of the user's earliest instance with that label
  earliest    label of the user's single earliest instance, None on a tie
Parameters: A, B (labels), k, k2 (ints), year (int), date (ISO string).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from typing import Any

from rlm_train.tasks import corpora, oolong
from rlm_train.tasks.family import Family
from rlm_train.tasks.scoring import score_pairs

MIN_TOKENS = 1000
MAX_PAIRS = 300  # keep answers listable; predicates are retried until one fits

# kind: both  -> pairs where both users satisfy `expr`
#       cross -> one user satisfies `expr`, the other `expr2` (either way round)
#       equal -> users with the same non-None value of `expr`
#       sum   -> users with `expr` >= 1 whose values add up to k
TEMPLATES: list[dict] = [
    {"id": "both_has", "kind": "both", "expr": "c[A] >= 1",
     "text": "both users have at least one instance with the label '{A}'"},
    {"id": "both_has_two", "kind": "both", "expr": "c[A] >= 1 and c[B] >= 1",
     "text": "both users have at least one '{A}' instance and at least one '{B}' instance"},
    {"id": "both_at_least", "kind": "both", "expr": "c[A] >= k",
     "text": "both users have at least {k} instances with the label '{A}'"},
    {"id": "both_exactly", "kind": "both", "expr": "c[A] == k",
     "text": "both users have exactly {k} instances with the label '{A}'"},
    {"id": "both_none", "kind": "both", "expr": "c[A] == 0 and n >= k",
     "text": "both users have no '{A}' instance and at least {k} instances in total"},
    {"id": "both_mode", "kind": "both", "expr": "mode == A",
     "text": "for both users, '{A}' is strictly the most common label of their instances"},
    {"id": "both_only", "kind": "both", "expr": "n >= k and c[A] == n",
     "text": "both users have at least {k} instances and all of them have the label '{A}'"},
    {"id": "both_a_not_b", "kind": "both", "expr": "c[A] >= 1 and c[B] == 0",
     "text": "both users have at least one '{A}' instance and no '{B}' instance"},
    {"id": "both_more", "kind": "both", "expr": "c[A] > c[B] and n >= k",
     "text": "both users have at least {k} instances and more '{A}' instances than '{B}' instances"},
    {"id": "both_distinct", "kind": "both", "expr": "len(labels) == k",
     "text": "the instances of each user cover exactly {k} different labels"},
    {"id": "both_total", "kind": "both", "expr": "n == k and c[A] >= 1",
     "text": "both users have exactly {k} instances in total, at least one of them with the label '{A}'"},
    {"id": "both_year", "kind": "both", "expr": "year in years[A]",
     "text": "both users have a '{A}' instance dated in {year}"},
    {"id": "both_before", "kind": "both", "expr": "A in first_date and first_date[A] < date",
     "text": "both users have a '{A}' instance dated before {date_text}"},
    {"id": "both_earliest", "kind": "both", "expr": "earliest == A and n >= k",
     "text": "both users have at least {k} instances and the earliest-dated one has the label '{A}'"},
    {"id": "cross_at_least", "kind": "cross", "expr": "c[A] >= k", "expr2": "c[B] >= k",
     "text": "one user has at least {k} '{A}' instances and the other has at least {k} '{B}' instances"},
    {"id": "cross_has_none", "kind": "cross", "expr": "c[A] >= k", "expr2": "c[A] == 0 and n >= k2",
     "text": "one user has at least {k} '{A}' instances and the other has none but at least {k2} instances in total"},
    {"id": "equal_count", "kind": "equal", "expr": "c[A] if c[A] >= k else None",
     "text": "the two users have the same number of '{A}' instances, and that number is at least {k}"},
    {"id": "equal_mode", "kind": "equal", "expr": "mode if n >= k else None",
     "text": "each user has at least {k} instances and both have the same strictly most common label"},
    {"id": "equal_total", "kind": "equal", "expr": "n if n >= k else None",
     "text": "the two users have the same total number of instances, and that number is at least {k}"},
    {"id": "sum_exact", "kind": "sum", "expr": "c[A]",
     "text": "each user has at least one '{A}' instance and together they have exactly {k} of them"},
]


def user_stats(records: list[oolong.Record]) -> dict[int, dict]:
    """The per-user names the template expressions use (see the module docstring)."""
    grouped: dict[int, list[oolong.Record]] = defaultdict(list)
    for r in records:
        grouped[r.user].append(r)
    stats = {}
    for user, rows in grouped.items():
        counts = Counter(r.label for r in rows)
        top = counts.most_common(2)
        dates = sorted(rows, key=lambda r: r.date)
        years: dict[str, set[int]] = defaultdict(set)
        first: dict[str, str] = {}
        for r in dates:
            years[r.label].add(r.date.year)
            first.setdefault(r.label, r.date.isoformat())
        tie = len(dates) > 1 and dates[0].date == dates[1].date
        stats[user] = {
            "c": defaultdict(int, counts),
            "n": len(rows),
            "labels": set(counts),
            "mode": top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else None,
            "years": years,
            "first_date": first,
            "earliest": None if tie else dates[0].label,
        }
    return stats


def evaluate(template: dict, params: dict, stats: dict[int, dict], limit: int | None = None) -> list[tuple[int, int]] | None:
    """The sorted pairs a template selects; None when more than `limit` would."""
    def values(expr: str) -> dict[int, Any]:  # what the template's expression gives per user
        code = compile(expr, "<predicate>", "eval")
        return {u: eval(code, {"__builtins__": {"len": len}}, {**params, **s}) for u, s in stats.items()}

    kind = template["kind"]
    if kind == "both":
        chosen = sorted(u for u, ok in values(template["expr"]).items() if ok)
        if limit is not None and len(chosen) * (len(chosen) - 1) // 2 > limit:
            return None
        return list(itertools.combinations(chosen, 2))
    if kind == "cross":
        left = {u for u, ok in values(template["expr"]).items() if ok}
        right = {u for u, ok in values(template["expr2"]).items() if ok}
        if limit is not None and len(left) * len(right) > 4 * limit + 100:
            return None
        pairs = {(min(a, b), max(a, b)) for a in left for b in right if a != b}
    elif kind == "equal":
        groups: dict[object, list[int]] = defaultdict(list)
        for u, v in values(template["expr"]).items():
            if v is not None:
                groups[v].append(u)
        if limit is not None and sum(len(g) * (len(g) - 1) // 2 for g in groups.values()) > limit:
            return None
        pairs = {p for g in groups.values() for p in itertools.combinations(sorted(g), 2)}
    elif kind == "sum":
        by_value: dict[int, list[int]] = defaultdict(list)
        for u, v in values(template["expr"]).items():
            if v >= 1:
                by_value[v].append(u)
        pairs = set()
        for v, us in by_value.items():
            others = by_value.get(params["k"] - v, [])
            pairs.update((min(a, b), max(a, b)) for a in us for b in others if a != b)
            if limit is not None and len(pairs) > limit:
                return None
    else:
        raise ValueError(f"unknown predicate kind {kind!r}")
    out = sorted(pairs)
    return None if limit is not None and len(out) > limit else out


def _params(rng: random.Random, records: list[oolong.Record], stats: dict[int, dict]) -> dict:
    a, b = rng.sample(corpora.LABELS, 2)
    totals = sorted(s["n"] for s in stats.values())
    day = rng.choice(records).date
    return {
        "A": a,
        "B": b,
        # Thresholds drawn from what users actually have, so predicates select a few users.
        "k": max(1, rng.choice(totals[len(totals) // 2:])) if rng.random() < 0.5 else rng.randint(1, 4),
        "k2": rng.randint(1, 3),
        "year": day.year,
        "date": day.isoformat(),
        "date_text": day.strftime(oolong.DATE_FORMAT),
    }


def template_text(template: dict, params: dict) -> str:
    return template["text"].format(**params)


def generate(rng: random.Random, target_chars: int, split: str) -> dict:
    records = oolong.make_records(rng, target_chars, split)
    stats = user_stats(records)
    for _ in range(400):
        template = rng.choice(TEMPLATES)
        params = _params(rng, records, stats)
        if template["kind"] == "sum":
            params["k"] = rng.randint(2, 6)
        pairs = evaluate(template, params, stats, limit=MAX_PAIRS)
        if pairs:
            break
    else:  # practically unreachable: every record set has users with a busiest label
        raise RuntimeError("no pairs predicate selected between 1 and MAX_PAIRS pairs")
    query = (
        f"{oolong.describe(records)}\n\nQuestion: List every pair of user ids such that "
        f"{template_text(template, params)}. Give each pair once, smaller id first, one per line "
        "as (id1, id2)."
    )
    return {
        "query": query,
        "context": oolong.render(records),
        "answer": [list(p) for p in pairs],
        "meta": {
            "predicate": template["id"],
            "params": {k: v for k, v in params.items() if k != "date_text"},
            "records": len(records),
            "users": len(stats),
            "labels": list(corpora.LABELS),
        },
    }


def score(task: dict, answer) -> float:
    """F1 between the answer's user-id pairs and the expected ones."""
    return score_pairs(task["answer"], answer)


FAMILY = Family(name="pairs", generate=generate, scorer="pairs_f1", score=score, min_tokens=MIN_TOKENS,
                split_keys=oolong.split_keys)
