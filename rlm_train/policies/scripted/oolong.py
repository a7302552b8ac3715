"""Scripted strategy for OOLONG aggregation: peek at the records, classify every
instance with batched sub-calls (the label is not in the text), re-ask for any reply
that did not parse, then aggregate in code for the question asked, and submit.

`classify_code` is shared with the pairs strategy."""

from __future__ import annotations

import datetime as dt
import re

from rlm_train.policies.scripted.view import EpisodeView, repl_block

DEFAULT_LABELS = ["history", "geography", "science", "technology", "politics", "education"]


def query_labels(query: str) -> list[str]:
    """The label names the query lists: `name (description)` items after 'these topics:'."""
    m = re.search(r"these topics: (.+?)\. The topic", query, re.DOTALL)
    if not m:
        return DEFAULT_LABELS
    found = re.findall(r"(?:^|, )([a-z]+) \(", m.group(1))
    return found or DEFAULT_LABELS


def peek_code(view: EpisodeView) -> str:
    return view.rng.choice(
        [
            "lines = context.splitlines()\nprint(len(lines), 'lines')\nfor line in lines[:4]:\n    print(line)",
            "print(len(context), 'characters')\nprint(context[:600])",
            "rows = context.split('\\n')\nprint(f'{len(rows)} rows; first and last:')\nprint(rows[0])\nprint(rows[-1])",
        ]
    )


_PROMPTS = [
    "Classify each question below by its topic. Topics: {labels}.\n"
    "Reply with exactly one topic per line, in the same order, and nothing else.\n\n",
    "For every numbered question, say which topic it is about ({labels}).\n"
    "Answer with one topic word per line, keeping the order.\n\n",
    "Label the topic of each of these questions. Allowed labels: {labels}.\n"
    "Output one label per line in order; no numbering, no explanations.\n\n",
]


def classify_code(view: EpisodeView, labels: list[str]) -> str:
    """Parse every record, classify the instances in batches, leave `records` and `pred`."""
    batch = view.rng.choice([25, 40, 50, 60])
    header = view.rng.choice(_PROMPTS).format(labels=", ".join(labels))
    return f"""import re
LABELS = {labels!r}
records = []
for line in context.splitlines():
    m = re.match(r"Date: (.*?) \\|\\| User: (\\d+) \\|\\| Instance: (.*)", line)
    if m:
        records.append((m.group(1), int(m.group(2)), m.group(3).strip()))
header = {header!r}
prompts = []
for start in range(0, len(records), {batch}):
    chunk = records[start:start + {batch}]
    prompts.append(header + "\\n".join(f"{{i + 1}}. {{r[2]}}" for i, r in enumerate(chunk)))
replies = llm_query_batched(prompts)

def to_label(text):
    words = re.findall(r"[a-z]+", text.lower())
    hits = [w for w in words if w in LABELS]
    return hits[0] if hits else None

pred = []
for start, reply in zip(range(0, len(records), {batch}), replies):
    size = len(records[start:start + {batch}])
    got = [to_label(l) for l in reply.splitlines() if l.strip()]
    pred += (got + [None] * size)[:size] if len(got) == size else [None] * size
missing = [i for i, p in enumerate(pred) if p is None]
print(len(records), "records parsed,", len(prompts), "batches,", len(missing), "unlabeled")"""


def retry_code(view: EpisodeView) -> str:
    """Ask again, one instance a prompt, for the records whose batch reply did not parse."""
    return """again = llm_query_batched([header + "1. " + records[i][2] for i in missing])
for i, reply in zip(missing, again):
    pred[i] = to_label(reply)
missing = [i for i, p in enumerate(pred) if p is None]
print("after retry:", len(missing), "unlabeled")"""


def question_code(query: str, labels: list[str]) -> tuple[str, str]:
    """(aggregation code that sets `answer`, kind) for the question in the query."""
    q = query[query.rfind("Question:"):]
    m = re.search(r"from user (\d+) have the label '(\w+)'", q)
    if m:
        return f"answer = sum(1 for r, p in zip(records, pred) if r[1] == {m.group(1)} and p == {m.group(2)!r})", "count"
    m = re.search(r"instances from user (\d+)\?", q)
    if m:
        return _extreme(f"r[1] == {m.group(1)}", labels, most=True), "label"
    m = re.search(r"dated from (.+?) to (.+?) \(inclusive\)", q)
    if m:
        lo = dt.datetime.strptime(m.group(1), "%b %d, %Y").date().isoformat()
        hi = dt.datetime.strptime(m.group(2), "%b %d, %Y").date().isoformat()
        cond = f"{lo!r} <= day(r[0]) <= {hi!r}"
        prelude = (
            "import datetime\n"
            "def day(text):\n    return datetime.datetime.strptime(text, '%b %d, %Y').date().isoformat()\n"
        )
        label = re.search(r"have the label '(\w+)'", q)
        if label:
            return prelude + f"answer = sum(1 for r, p in zip(records, pred) if {cond} and p == {label.group(1)!r})", "count"
        return prelude + _extreme(cond, labels, most=True), "label"
    m = re.search(r"have the label '(\w+)'", q)
    if m:
        return f"answer = sum(1 for p in pred if p == {m.group(1)!r})", "count"
    most = "least common" not in q
    return _extreme("True", labels, most=most), "label"


def _extreme(cond: str, labels: list[str], most: bool) -> str:
    pick = "max" if most else "min"
    return (
        f"counts = {{label: 0 for label in {labels!r}}}\n"
        f"for r, p in zip(records, pred):\n    if p and {cond}:\n        counts[p] += 1\n"
        f"print(sorted(counts.items(), key=lambda kv: -kv[1]))\n"
        f"answer = {pick}(counts, key=counts.get)"
    )


def next_turn(view: EpisodeView) -> str:
    labels = query_labels(view.query)
    last = view.last_output
    seen = view.all_outputs
    if view.last_turn or "ANSWER" in last:
        return view.rng.choice(["Submitting the aggregate.", "That is the answer."]) + "\n" + repl_block(
            view.rng.choice(["FINAL_VAR('answer')", "FINAL(str(answer))"])
        )
    if view.turn == 0 and view.rng.random() < 0.8:
        return view.rng.choice(["Let me look at the record format first.", "First a peek at the data."]) + "\n" + repl_block(
            peek_code(view)
        )
    if "records parsed" not in seen:
        intro = view.rng.choice(
            [
                "The label is not in the lines, so I classify every instance with batched sub-calls.",
                "Each instance needs a topic; I split the records into batches and ask the sub-model.",
            ]
        )
        return f"{intro}\n{repl_block(classify_code(view, labels))}"
    unlabeled = re.findall(r"(\d+) unlabeled", last)
    if unlabeled and unlabeled[-1] != "0" and "after retry" not in last:
        return "Some replies did not parse; asking again one instance at a time.\n" + repl_block(retry_code(view))
    code, kind = question_code(view.query, labels)
    intro = view.rng.choice(["Now aggregate the labels for the question.", "Count in code over the labelled records."])
    return f"{intro}\n{repl_block(code + chr(10) + 'print(' + repr('ANSWER') + ', answer)')}"
