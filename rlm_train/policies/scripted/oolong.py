"""Scripted strategy for OOLONG aggregation: (sometimes) peek at the records; classify
every instance with batched sub-calls (the label is not in the text) and aggregate in
code for the question asked, in one cell; re-ask for any reply that did not parse; submit.

`classify_code` is shared with the pairs strategy."""

from __future__ import annotations

import re

from rlm_train.policies.scripted.view import EpisodeView, double_quoted, repl_block

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
    (None or a stray word where a batch's reply did not parse), `missing` and the helpers the retry uses.
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
    pred += got if len(got) == len(c) else [None] * len(c)
missing = [i for i, p in enumerate(pred) if p not in LABELS]
print(len(records), "records parsed,", len(missing), "unlabeled")"""


def retry_code(view: EpisodeView) -> str:
    """Ask again, one instance a prompt, for the records whose batch reply did not parse."""
    return """again = llm_query_batched([ask + records[i][2] for i in missing])
for i, reply in zip(missing, again):
    words = [w for w in re.findall(r"[a-z]+", reply.lower()) if w in LABELS]
    pred[i] = words[0] if words else None
missing = [i for i, p in enumerate(pred) if p not in LABELS]
print("after retry:", len(missing), "unlabeled")"""


def question_text(query: str) -> str:
    """The question sentence of an oolong query ("Question: ... ?"), without the answer-form tail."""
    q = query[query.rfind("Question:") + len("Question:"):].strip()
    return re.split(r"\s+Answer with ", q)[0].strip()


# The aggregation is one program for every question: it reads the question's anchors
# (a quoted 'label' asks for a count, "user N" and two dates narrow the records,
# least/fewest flips the extreme) from the question string copied into the code. So a
# model that learns it needs to copy the question, not to map each wording to code.
AGGREGATE_CODE = """import datetime
day = lambda text: datetime.datetime.strptime(text, '%b %d, %Y').date()
user = re.findall(r"user (\\d+)", question, re.I)
dates = [day(d) for d in re.findall(r"\\w{3} \\d\\d, \\d{4}", question)]
keep = [p for r, p in zip(records, pred) if (not user or r[1] == int(user[0])) and (not dates or dates[0] <= day(r[0]) <= dates[-1])]
counts = {name: keep.count(name) for name in LABELS}
print(counts)
label = re.findall(r"'(\\w+)'", question)
answer = counts[label[0]] if label else (min if re.search("least|fewest", question) else max)(counts, key=counts.get)
print('ANSWER', answer)"""


# Aggregate, print, and submit in the same cell when every record got a label (else the
# next turn retries the unparsed ones first).
ANSWER_CODE = AGGREGATE_CODE + "\nif not missing:\n    FINAL_VAR('answer')"


def next_turn(view: EpisodeView) -> str:
    """Classification and aggregation run in one cell (a short, complete program) that
    submits when every record got a label; a peek first sometimes, a retry when replies
    did not parse, then the submit."""
    labels = query_labels(view.query)
    last = view.last_output
    seen = view.all_outputs
    unlabeled = re.findall(r"(\d+) unlabeled", last)
    needs_retry = bool(unlabeled) and unlabeled[-1] != "0" and "after retry" not in seen
    if needs_retry and not view.last_turn:
        return "Some replies did not parse; asking again one instance at a time.\n" + repl_block(
            retry_code(view) + "\n" + ANSWER_CODE
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
    program = f"question = {double_quoted(question_text(view.query))}\n{classify_code(view, labels)}\n{ANSWER_CODE}"
    return f"{intro}\n{repl_block(program)}"
