"""Scripted strategy for OOLONG aggregation: (sometimes) peek at the records; classify
every instance with one sub-call per question, batched (the label is not in the text),
and aggregate in code, in one cell; re-ask for any record whose reply named no label;
submit.

The aggregation is written for the question's kind (a count of one label, a user filter,
a literal date window, the most or least frequent) with the question's literals in the
code: the teacher reads kind and literals from the question on the host, so a model that
learns from it has to map a wording, seen or not, to the right program.
`most_frequent_kind_turn` is the most-frequent-kind floor: the same teacher, always
writing the count program. `classify_code` and `retry_code` are shared with pairs."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

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


def classify_code(view: EpisodeView, labels: list[str]) -> str:
    """Parse every record, classify each instance with its own sub-call (one question a prompt:
    a small sub-model answers it far more reliably than a numbered batch), leave `records`,
    `pred` (None where a reply named no label), `missing` and the names the retry uses.
    Kept short: a small model has to write it back token by token."""
    return f"""import re
LABELS = {labels!r}
records = [(d, int(u), t) for d, u, t in re.findall(r"Date: (.*?) \\|\\| User: (\\d+) \\|\\| Instance: (.*)", context)]
ask = "The topic of this question, one of: " + ", ".join(LABELS) + ". Reply with the topic only.\\n"
replies = llm_query_batched([ask + r[2] for r in records])
pred = [next((w for w in re.findall(r"[a-z]+", reply.lower()) if w in LABELS), None) for reply in replies]
missing = [i for i, p in enumerate(pred) if p is None]
print(len(records), "records parsed,", len(missing), "unlabeled")"""


def retry_code(view: EpisodeView) -> str:
    """Ask once more for the records whose reply named no label (a sampling sub-model may answer)."""
    return """again = llm_query_batched([ask + records[i][2] for i in missing])
for i, reply in zip(missing, again):
    pred[i] = next((w for w in re.findall(r"[a-z]+", reply.lower()) if w in LABELS), None)
missing = [i for i, p in enumerate(pred) if p is None]
print("after retry:", len(missing), "unlabeled")"""


def question_text(query: str) -> str:
    """The question sentence of an oolong query ("Question: ... ?"), without the answer-form tail."""
    q = query[query.rfind("Question:") + len("Question:"):].strip()
    return re.split(r"\s+Answer with ", q)[0].strip()


_DATE = re.compile(r"[A-Z][a-z]{2} \d{2}, \d{4}")
DATE_FORMAT = "%b %d, %Y"  # as the records write dates (tasks.oolong.DATE_FORMAT)


@dataclass(frozen=True)
class Question:
    """What the teacher reads from a question on the host (the model has to learn it)."""

    kind: str  # a tasks.oolong question kind: count, most_common, ..., range_most
    label: str | None  # the quoted label a count asks for
    user: int | None
    dates: tuple[str, str] | None  # (first, last) day of a window, as the records write them


def read_question(question: str, labels: list[str]) -> Question:
    """The kind and literals of a question, from its anchors (every wording in
    tasks.oolong.QUESTIONS keeps them): a quoted label asks for a count, "user N" and two
    dates narrow the records (in either order), "least" flips the extreme."""
    quoted = [w for w in re.findall(r"'([a-z]+)'", question) if w in labels]
    label = quoted[0] if quoted else None
    user = re.findall(r"\buser (\d+)", question, re.I)
    days = sorted(set(_DATE.findall(question)), key=lambda d: dt.datetime.strptime(d, DATE_FORMAT))
    dates = (days[0], days[-1]) if len(days) >= 2 else None
    if dates:
        kind = "range_count" if label else "range_most"
    elif user:
        kind = "user_count" if label else "user_most_common"
    elif label:
        kind = "count"
    else:
        kind = "least_common" if re.search(r"\b(least|fewest)\b", question, re.I) else "most_common"
    return Question(kind, label, int(user[0]) if user else None, dates)


def aggregate_code(q: Question, labels: list[str]) -> str:
    """The program for one question kind, with the question's literals written in: a filter
    (user or date window), the label counts, then one label's count or the extreme label."""
    lines, source = [], "pred"
    if q.kind.startswith("user"):
        lines.append(f"keep = [p for r, p in zip(records, pred) if r[1] == {q.user}]")
        source = "keep"
    elif q.kind.startswith("range") and q.dates:
        lo, hi = q.dates
        lines += ["import datetime",
                  f"day = lambda text: datetime.datetime.strptime(text, '{DATE_FORMAT}').date()",
                  f"keep = [p for r, p in zip(records, pred) if day('{lo}') <= day(r[0]) <= day('{hi}')]"]
        source = "keep"
    lines += [f"counts = {{name: {source}.count(name) for name in LABELS}}", "print(counts)"]
    if q.kind.endswith("count"):
        lines.append(f"answer = counts['{q.label or labels[0]}']")
    else:
        lines.append(f"answer = {'min' if q.kind == 'least_common' else 'max'}(counts, key=counts.get)")
    lines.append("print('ANSWER', answer)")
    return "\n".join(lines)


FLOOR_KIND = "count"
"""The most-frequent-kind floor's kind. The seven kinds are drawn about equally often in
training; count is tied for the most frequent, and its program (one label's count over all
records) is also the answer form of user_count and range_count questions."""


def answer_code(view: EpisodeView, labels: list[str], floor: bool) -> str:
    """Aggregate, print, and submit in the same cell when every record got a label (else the
    next turn retries the unanswered ones first)."""
    q = read_question(question_text(view.query), labels)
    if floor:
        q = Question(FLOOR_KIND, q.label, None, None)
    return aggregate_code(q, labels) + "\nif not missing:\n    FINAL_VAR('answer')"


def next_turn(view: EpisodeView, floor: bool = False) -> str:
    """Classification and aggregation run in one cell (a short, complete program) that
    submits when every record got a label; a peek first sometimes, a retry when replies
    did not parse, then the submit. `floor`: write the most frequent kind's program."""
    labels = query_labels(view.query)
    last = view.last_output
    seen = view.all_outputs
    unlabeled = re.findall(r"(\d+) unlabeled", last)
    needs_retry = bool(unlabeled) and unlabeled[-1] != "0" and "after retry" not in seen
    if needs_retry and not view.last_turn:
        return "Some replies did not parse; asking again one question at a time.\n" + repl_block(
            retry_code(view) + "\n" + answer_code(view, labels, floor)
        )
    if view.last_turn or "ANSWER" in last:
        return view.rng.choice(["Submitting the aggregate.", "That is the answer."]) + "\n" + repl_block(
            view.rng.choice(["FINAL_VAR('answer')", "FINAL(str(answer))"])
        )
    if view.turn == 0 and view.rng.random() < 0.1:
        return view.rng.choice(["Let me look at the record format first.", "First a peek at the data."]) + "\n" + repl_block(
            peek_code(view)
        )
    intro = view.rng.choice(
        [
            "The label is not in the lines, so I classify every instance with batched sub-calls, then count in code.",
            "Each instance needs a topic; I ask the sub-model in batches and aggregate for the question.",
        ]
    )
    program = classify_code(view, labels) + "\n" + answer_code(view, labels, floor)
    return f"{intro}\n{repl_block(program)}"


def most_frequent_kind_turn(view: EpisodeView) -> str:
    """The most-frequent-kind floor's turn: the teacher's, with the count program for every question."""
    return next_turn(view, floor=True)
