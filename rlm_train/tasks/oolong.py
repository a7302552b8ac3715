"""`oolong`: aggregation over thousands of records whose class must be inferred.

One record a line: `Date: <date> || User: <id> || Instance: <text>`. The instance is a
real question (SQuAD v2 dev); its class is the topic of the article it was asked
about, one of `corpora.LABELS`, never written in the line. Counting a class, finding
the most or least common one, per user or per date range, needs every line
classified: partition + batched sub-calls, then aggregate in code.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass

from rlm_train.tasks import corpora
from rlm_train.tasks.family import Family
from rlm_train.tasks.scoring import score_oolong

MIN_TOKENS = 1000  # about 30 records: enough for a question with a unique answer

RECORD_FORMAT = "Date: {date} || User: {user} || Instance: {text}"
DATE_FORMAT = "%b %d, %Y"  # "Mar 04, 2023"
# User ids of each split come from disjoint ranges, so they are keys of their split.
USER_RANGES = {"train": (10_000, 44_999), "rl": (45_000, 59_999), "heldout": (60_000, 99_999)}


@dataclass(frozen=True)
class Record:
    date: dt.date
    user: int
    text: str
    label: str
    line: str  # the rendered record, built once


def make_records(rng: random.Random, target_chars: int, split: str, users_per_record: float = 1 / 10) -> list[Record]:
    """Records filling `target_chars`, with class mix, users and dates drawn per task."""
    pool = corpora.instances(split)
    by_label: dict[str, list[corpora.Instance]] = {label: [] for label in corpora.LABELS}
    for inst in pool:
        by_label[inst.label].append(inst)
    # A per-task class mix, so "most common" cannot be guessed from corpus priors.
    label_cum = list(itertools.accumulate(rng.uniform(0.2, 1.0) ** 2 for _ in corpora.LABELS))
    n_est = max(1, target_chars // 95)
    lo, hi = USER_RANGES[split]
    n_users = min(max(3, int(n_est * users_per_record)), (hi - lo) // 2)
    users = rng.sample(range(lo, hi + 1), n_users)
    # Zipf-like activity: a few busy users, many with a handful of records.
    user_cum = list(itertools.accumulate(1.0 / (rank + 1) ** 0.8 for rank in range(n_users)))
    start = dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(0, 4 * 365))
    days = [start + dt.timedelta(days=i) for i in range(rng.randrange(180, 900))]
    day_text = [d.strftime(DATE_FORMAT) for d in days]

    order = {label: rng.sample(range(len(items)), len(items)) for label, items in by_label.items()}
    taken: Counter[str] = Counter()
    records: list[Record] = []
    total = 0
    while total < target_chars:
        # Draw in batches (one call each) and stop at the target; batches are seeded draws too.
        batch = max(16, n_est // 4)
        labels = rng.choices(corpora.LABELS, cum_weights=label_cum, k=batch)
        chosen_users = rng.choices(users, cum_weights=user_cum, k=batch)
        chosen_days = [rng.randrange(len(days)) for _ in range(batch)]
        for label, user, day in zip(labels, chosen_users, chosen_days):
            items = by_label[label]
            # Walk a shuffled order; reuse only once a label's pool is exhausted (1M+ tokens).
            inst = items[order[label][taken[label] % len(items)]]
            taken[label] += 1
            line = RECORD_FORMAT.format(date=day_text[day], user=user, text=inst.text)
            records.append(Record(days[day], user, inst.text, label, line))
            total += len(line) + 1
            if total >= target_chars:
                break
    if len(records) > 1:
        records.pop()  # stay at or under the target
    return records


def render(records: list[Record]) -> str:
    return "\n".join(r.line for r in records)


def label_list() -> str:
    return ", ".join(f"{label} ({corpora.LABEL_HELP[label]})" for label in corpora.LABELS)


def describe(records: list[Record]) -> str:
    return (
        f"The context holds {len(records)} records, one per line, in the form "
        "`Date: <date> || User: <user id> || Instance: <question>`. Each instance is a question "
        f"about one of these topics: {label_list()}. The topic (its label) is not written in the "
        "line; infer it from the question's text."
    )


# Question wordings by kind and split: held-out tasks ask in words AND sentence structures
# no training task uses (the condition before the question, the answer slot last, passive
# voice, dates in reverse order, "records"/"entries"/"lines"), so a model must map a new
# sentence to the right program. Every wording keeps the anchors the answer needs: the
# 'label' in quotes, "user N", the two dates as the records write them, "most"/"least".
QUESTIONS = {
    "count": {
        "train": ("How many instances have the label '{label}'?",
                  "Count the instances whose label is '{label}'.",
                  "What is the number of instances labelled '{label}'?",
                  "'{label}': how many instances carry this label?",
                  "Tell me how many records are labelled '{label}'.",
                  "How many of the records are about '{label}'?",
                  "Give the total of '{label}' instances in the data."),
        "heldout": ("Among all the entries, the label '{label}' is given to how many?",
                    "If you count every line labelled '{label}', what number do you get?",
                    "Records tagged with the label '{label}' number how many in total?"),
    },
    "extreme": {
        "train": ("Which label is the {word} common among all instances?",
                  "What is the {word} frequent label over all instances?",
                  "Which label occurs the {word} often across all instances?",
                  "Name the {word} frequent label in the data.",
                  "Across the whole dataset, which label shows up the {word}?",
                  "Over all instances, which label is the {word} common?"),
        "heldout": ("Counting every entry, the {word} common label is which one?",
                    "The label that appears {word} often over all the lines: which is it?",
                    "If every record is labelled, which label will have been used the {word}?",
                    "Which one, among all labels, is {word} frequently given to the entries?"),
    },
    "user_count": {
        "train": ("How many instances from user {user} have the label '{label}'?",
                  "Count the '{label}' instances posted by user {user}.",
                  "User {user} posted how many '{label}' instances?",
                  "Among the records of user {user}, count those labelled '{label}'.",
                  "For user {user}, how many records carry the label '{label}'?",
                  "What is the number of instances from user {user} labelled '{label}'?"),
        "heldout": ("If only the entries of user {user} are kept, how many have the label '{label}'?",
                    "The label '{label}' was given to how many records written by user {user}?",
                    "How many '{label}' lines did user {user} write?"),
    },
    "user_most_common": {
        "train": ("Which label is the most common among the instances from user {user}?",
                  "What label does user {user} use most often?",
                  "Which label appears most often in the records of user {user}?",
                  "For user {user}, name the most frequent label.",
                  "Of all records by user {user}, which label appears the most?",
                  "What is the most common label among the instances of user {user}?"),
        "heldout": ("If only the entries of user {user} are kept, the most frequent label is which?",
                    "The lines written by user {user} are most often given which label?",
                    "Looking at user {user} alone, which one of the labels comes up most?"),
    },
    "range_count": {
        "train": ("How many instances dated from {lo} to {hi} (inclusive) have the label '{label}'?",
                  "Count the '{label}' instances with dates from {lo} to {hi}, both included.",
                  "'{label}' instances dated between {lo} and {hi} inclusive: how many?",
                  "What is the number of '{label}' instances dated from {lo} to {hi} (inclusive)?",
                  "How many instances labelled '{label}' are dated from {lo} through {hi}, both included?"),
        "heldout": ("Between {lo} and {hi} (both days included), how many records are labelled '{label}'?",
                    "The label '{label}' was given to how many entries dated no earlier than {lo} and no later than {hi}?",
                    "Up to and including {hi}, and starting on {lo}, how many lines carry the label '{label}'?",
                    "If only the records dated {lo} to {hi} (inclusive) are kept, how many of them have the label '{label}'?"),
    },
    "range_most": {
        "train": ("Which label is the most common among instances dated from {lo} to {hi} (inclusive)?",
                  "From {lo} to {hi}, both included, what is the most common label?",
                  "What label is most frequent among records dated {lo} through {hi} (inclusive)?",
                  "Name the most frequent label among instances dated from {lo} to {hi}, both included.",
                  "Among the instances dated between {lo} and {hi} inclusive, which label appears most often?"),
        "heldout": ("Between {lo} and {hi} (both days included), which label appears the most?",
                    "The entries dated no earlier than {lo} and no later than {hi} are most often given which label?",
                    "Up to and including {hi}, and starting on {lo}, which label is given to the most lines?",
                    "If only the records dated {lo} to {hi} (inclusive) are kept, the most common label is which?"),
    },
}


def _ask(rng: random.Random, kind: str, split: str, **slots) -> str:
    pool = QUESTIONS[kind].get(split, QUESTIONS[kind]["train"])
    return rng.choice(pool).format(**slots)


def _unique_extreme(counts: Counter, most: bool) -> str | None:
    """The label with the strictly highest (or lowest) count over all labels, else None."""
    full = [(counts.get(label, 0), label) for label in corpora.LABELS]
    full.sort(reverse=most)
    if full[0][0] == full[1][0]:
        return None
    return full[0][1]


def _fmt(day: dt.date) -> str:
    return day.strftime(DATE_FORMAT)


def question(rng: random.Random, records: list[Record], split: str = "train") -> tuple[str, str | int, str]:
    """(question text, answer, kind), trying kinds in a random order until one has a unique answer."""
    kinds = ["count", "most_common", "least_common", "user_count", "user_most_common", "range_count", "range_most"]
    rng.shuffle(kinds)
    counts = Counter(r.label for r in records)
    per_user: dict[int, Counter] = {}
    for r in records:
        per_user.setdefault(r.user, Counter())[r.label] += 1
    dates = sorted({r.date for r in records})
    for kind in kinds:
        if kind == "count":
            label = rng.choice(corpora.LABELS)
            return _ask(rng, "count", split, label=label), counts.get(label, 0), kind
        if kind in ("most_common", "least_common"):
            most = kind == "most_common"
            answer = _unique_extreme(counts, most)
            if answer is not None:
                return _ask(rng, "extreme", split, word="most" if most else "least"), answer, kind
        if kind in ("user_count", "user_most_common"):
            busy = sorted(u for u, c in per_user.items() if sum(c.values()) >= 3)
            if not busy:
                continue
            user = rng.choice(busy)
            if kind == "user_count":
                label = rng.choice(corpora.LABELS)
                return _ask(rng, "user_count", split, user=user, label=label), per_user[user].get(label, 0), kind
            top = per_user[user].most_common(2)
            if len(top) == 1 or top[0][1] > top[1][1]:
                return _ask(rng, "user_most_common", split, user=user), top[0][0], kind
        if kind in ("range_count", "range_most") and len(dates) >= 4:
            i, j = sorted(rng.sample(range(len(dates)), 2))
            lo, hi = dates[i], dates[j]
            inside = Counter(r.label for r in records if lo <= r.date <= hi)
            if kind == "range_count":
                label = rng.choice(corpora.LABELS)
                return _ask(rng, "range_count", split, lo=_fmt(lo), hi=_fmt(hi), label=label), inside.get(label, 0), kind
            if sum(inside.values()) >= 3:
                answer = _unique_extreme(inside, True)
                if answer is not None:
                    return _ask(rng, "range_most", split, lo=_fmt(lo), hi=_fmt(hi)), answer, kind
    label = corpora.LABELS[0]
    return _ask(rng, "count", split, label=label), counts.get(label, 0), "count"


def generate(rng: random.Random, target_chars: int, split: str) -> dict:
    records = make_records(rng, target_chars, split)
    text, answer, kind = question(rng, records, split)
    form = "a single number" if isinstance(answer, int) else "one label from the list"
    query = f"{describe(records)}\n\nQuestion: {text} Answer with {form}."
    return {
        "query": query,
        "context": render(records),
        "answer": answer,
        "meta": {"question_kind": kind, "records": len(records), "users": len({r.user for r in records}),
                 "labels": list(corpora.LABELS)},
    }


def score(task: dict, answer) -> float:
    """Labels: exact match; numbers: 0.75 ** |error| (see scoring.score_oolong)."""
    return score_oolong(task["answer"], answer, task.get("meta", {}).get("labels") or [])


_INSTANCE_TEXT = re.compile(r"\|\| Instance: (.*)$", re.MULTILINE)
_USER = re.compile(r"\|\| User: (\d+) \|\|")


def split_keys(task: dict) -> dict:
    """Instance texts and user ids of the records (shared with `pairs`)."""
    context = task.get("context", "")
    return {"instance": _INSTANCE_TEXT.findall(context), "user": _USER.findall(context)}


FAMILY = Family(name="oolong", generate=generate, scorer="oolong", score=score, min_tokens=MIN_TOKENS,
                split_keys=split_keys)
