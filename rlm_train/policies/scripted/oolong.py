"""Scripted strategy for OOLONG aggregation: (sometimes) peek at the records; classify
every instance with batched sub-calls (the label is not in the text) and aggregate in
code for the question asked, in one cell; re-ask for any reply that did not parse; submit.

`classify_code` is shared with the pairs strategy."""

from __future__ import annotations

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
    "Give the topic of each question ({labels}), one per line, in order:\n",
    "For each question below, reply with its topic ({labels}), one word per line:\n",
    "Label every question with one of: {labels}. One label per line, same order:\n",
]


def classify_code(view: EpisodeView, labels: list[str]) -> str:
    """Parse every record, classify the instances in batches, leave `records`, `pred`
    (None where a batch's reply did not parse), `missing` and the helpers the retry uses.
    Kept short: a small model has to write it back token by token."""
    batch = view.rng.choice([25, 40, 50])
    # The label list is joined in code, so the program does not spell the labels twice.
    ask = view.rng.choice(_PROMPTS).format(labels='" + ", ".join(LABELS) + "').replace("\n", "\\n")
    return f"""import re
LABELS = {labels!r}
records = [(d, int(u), t) for d, u, t in re.findall(r"Date: (.*?) \\|\\| User: (\\d+) \\|\\| Instance: (.*)", context)]
ask = "{ask}"
chunks = [records[i:i + {batch}] for i in range(0, len(records), {batch})]
replies = llm_query_batched([ask + "\\n".join(r[2] for r in c) for c in chunks])
pred = []
for c, reply in zip(chunks, replies):
    got = [w.strip().lower() for w in reply.splitlines() if w.strip()]
    pred += [g if g in LABELS else None for g in got] if len(got) == len(c) else [None] * len(c)
missing = [i for i, p in enumerate(pred) if p is None]
print(len(records), "records parsed,", len(missing), "unlabeled")"""


def retry_code(view: EpisodeView) -> str:
    """Ask again, one instance a prompt, for the records whose batch reply did not parse."""
    return """again = llm_query_batched([ask + records[i][2] for i in missing])
for i, reply in zip(missing, again):
    words = [w for w in re.findall(r"[a-z]+", reply.lower()) if w in LABELS]
    pred[i] = words[0] if words else None
missing = [i for i, p in enumerate(pred) if p is None]
print("after retry:", len(missing), "unlabeled")"""


_DATE = r"[A-Z][a-z]{2} \d{2}, \d{4}"


def question_code(query: str, labels: list[str]) -> tuple[str, str]:
    """(aggregation code that sets `answer`, kind) for the question in the query. It reads
    the question's anchors, not its wording: a quoted 'label' asks for a count, "user N"
    and two dates narrow the records, "least"/"fewest" flips the extreme. Values are copied
    as written (dates are parsed in code), so the program is the question's text plus code."""
    q = query[query.rfind("Question:"):]
    label = re.search(r"'(\w+)'", q)
    user = re.search(r"\buser (\d+)", q, re.IGNORECASE)
    dates = re.findall(_DATE, q)
    conditions = []
    prelude = ""
    if user:
        conditions.append(f"r[1] == {user.group(1)}")
    if len(dates) >= 2:
        prelude = (
            "import datetime\n"
            "def day(text):\n    return datetime.datetime.strptime(text, '%b %d, %Y').date()\n"
            f"lo, hi = day({dates[0]!r}), day({dates[1]!r})\n"
        )
        conditions.append("lo <= day(r[0]) <= hi")
    cond = " and ".join(conditions) or "True"
    if label:
        if cond == "True":
            return f"answer = sum(1 for p in pred if p == {label.group(1)!r})", "count"
        return prelude + f"answer = sum(1 for r, p in zip(records, pred) if {cond} and p == {label.group(1)!r})", "count"
    most = not re.search(r"\b(least|fewest|rarest)\b", q)
    return prelude + _extreme(cond, labels, most=most), "label"


def _extreme(cond: str, labels: list[str], most: bool) -> str:
    pick = "max" if most else "min"
    test = "p" if cond == "True" else f"p and {cond}"
    return (
        "counts = {label: 0 for label in LABELS}\n"
        f"for r, p in zip(records, pred):\n    if {test}:\n        counts[p] += 1\n"
        f"print(sorted(counts.items(), key=lambda kv: -kv[1]))\n"
        f"answer = {pick}(counts, key=counts.get)"
    )


def _answer_code(view: EpisodeView, labels: list[str]) -> str:
    code, _ = question_code(view.query, labels)
    return code + "\nprint('ANSWER', answer)"


def next_turn(view: EpisodeView) -> str:
    """Classification and aggregation run in one cell (a short, complete program), then
    the answer is submitted; a peek first sometimes, a retry when replies did not parse."""
    labels = query_labels(view.query)
    last = view.last_output
    seen = view.all_outputs
    unlabeled = re.findall(r"(\d+) unlabeled", last)
    needs_retry = bool(unlabeled) and unlabeled[-1] != "0" and "after retry" not in seen
    if needs_retry and not view.last_turn:
        return "Some replies did not parse; asking again one instance at a time.\n" + repl_block(
            retry_code(view) + "\n" + _answer_code(view, labels)
        )
    if view.last_turn or "ANSWER" in last:
        return view.rng.choice(["Submitting the aggregate.", "That is the answer."]) + "\n" + repl_block(
            view.rng.choice(["FINAL_VAR('answer')", "FINAL(str(answer))"])
        )
    if view.turn == 0 and view.rng.random() < 0.2:
        return view.rng.choice(["Let me look at the record format first.", "First a peek at the data."]) + "\n" + repl_block(
            peek_code(view)
        )
    intro = view.rng.choice(
        [
            "The label is not in the lines, so I classify every instance with batched sub-calls, then count in code.",
            "Each instance needs a topic; I ask the sub-model in batches and aggregate for the question.",
        ]
    )
    return f"{intro}\n{repl_block(classify_code(view, labels) + chr(10) + _answer_code(view, labels))}"
