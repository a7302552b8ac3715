"""Read-nothing baselines: answers that never touch `context`.

- `ConstantPolicy` (spec `constant`): `rlm-train eval`'s constant-answer floor (fit on
  training tasks). Every task of a family gets one fixed answer per answer form (the
  query's "Answer with ..." sentence: oolong's label questions one label, its number
  questions one number), the one that scored best on the eval's `train_tasks` with the
  family's own scorer. A method must beat it to show it reads the context.
- `QueryOnlyPolicy`: a guess from the query's words (no fitting, no task files), which the
  task-suite tests use to show the tasks cannot be answered without the context: its
  scores sit near chance (0.25 for codeqa's four options, about 1/6 for oolong labels,
  ~0 elsewhere).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from rlm_train.errors import UserError
from rlm_train.models.base import CallablePolicy, CallContext, Role
from rlm_train.tasks import corpora


def guess_from_query(query: str, rng: random.Random) -> str:
    """The best guess a reader of the query alone can make, by the query's shape."""
    if "magic number" in query:
        return str(rng.randrange(1_000_000, 10_000_000))
    if "The correct answer is" in query:
        return f"The correct answer is ({rng.choice('ABCD')})"
    if "pair of user ids" in query:
        return ""  # no user ids are in the query; any pair is a blind guess
    if "Answer with a single number" in query:
        records = re.search(r"holds (\d+) records", query)
        # A uniform share of the records per label is the informed guess.
        return str(int(records.group(1)) // len(corpora.LABELS)) if records else "0"
    if "one label from the list" in query:
        return rng.choice(corpora.LABELS)
    names = re.findall(r"[A-Z][a-z]+(?: [A-Z][a-z]+)+", query)
    return names[-1] if names else "unknown"


class QueryOnlyPolicy(CallablePolicy):
    """A root policy that submits `guess_from_query` on its first turn."""

    def __init__(self):
        super().__init__(self._answer, name="query-only")

    @staticmethod
    def _answer(messages: list[dict[str, str]], call: CallContext) -> str:
        query = call.query or messages[-1]["content"]
        rng = random.Random(f"{call.hints.get('task_id')}:{call.hints.get('sample', 0)}")
        return f"I will answer from the question alone.\n```repl\nFINAL({guess_from_query(query, rng)!r})\n```"


# --------------------------------------------------------------------------- constant floor
MAX_CANDIDATES = 400  # distinct answers tried per (family, form): the most common first
_ANSWER_WITH = re.compile(r"\bAnswer with ([^\n]+)")


def answer_form(query: str) -> str:
    """The answer form a query asks for, from its last "Answer with ..." sentence
    ("a single number", "one label from the list"); "-" when it names none."""
    found = _ANSWER_WITH.findall(query)
    return found[-1].strip().rstrip(".").lower() if found else "-"


def answer_text(answer: Any) -> str:
    """A reference answer written as a FINAL value: a list one item a line, a pair as "(a, b)"."""
    if isinstance(answer, (list, tuple)):
        return "\n".join(f"({', '.join(str(x) for x in item)})" if isinstance(item, (list, tuple)) else str(item)
                         for item in answer)
    return str(answer)


def _candidates(tasks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Answers to try: the training answers, most common first, and for numbers every integer
    between their smallest and largest (the best constant under a graded score may be none of them)."""
    counts = Counter(answer_text(t["answer"]) for t in tasks)
    ordered = [a for a, _ in counts.most_common()]
    numbers = [t["answer"] for t in tasks if isinstance(t["answer"], int) and not isinstance(t["answer"], bool)]
    if numbers:
        ordered += [str(n) for n in range(min(numbers), max(numbers) + 1) if str(n) not in counts]
    return ordered[:MAX_CANDIDATES]


def best_constant(tasks: Sequence[Mapping[str, Any]]) -> tuple[str, float]:
    """The answer with the highest mean score over `tasks` (each scored by its own family's
    scorer) and that mean; ties go to the earlier candidate (the more common answer)."""
    from rlm_train.tasks import score

    best, best_mean = "", -1.0
    for candidate in _candidates(tasks):
        mean = sum(score(dict(t), candidate) for t in tasks) / len(tasks)
        if mean > best_mean:
            best, best_mean = candidate, mean
    return best, best_mean


def fit_constants(train_tasks: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"family\tform": {"answer", "train_score", "train_tasks"}}, plus one "family\t*" entry per
    family (all its forms together) for a form no training task asked."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for task in train_tasks:
        family = task.get("family") or "-"
        groups[f"{family}\t{answer_form(task['query'])}"].append(task)
        groups[f"{family}\t*"].append(task)
    fitted = {}
    for key, tasks in sorted(groups.items()):
        answer, mean = best_constant(tasks)
        fitted[key] = {"answer": answer, "train_score": round(mean, 4), "train_tasks": len(tasks)}
    return fitted


class ConstantPolicy(CallablePolicy):
    """The constant-answer floor (fit on training tasks): submits its family's and answer
    form's constant on the first root turn, reading only the family and the query's
    answer form (see the module docstring). Built by `rlm-train eval` from `train_tasks`."""

    writes_code = False  # it submits in prose: the loop starts no sandbox

    def __init__(self, train_tasks: Sequence[Mapping[str, Any]] | None = None):
        if not train_tasks:
            raise UserError("policy 'constant' is the eval's constant-answer floor, fit on its train_tasks: use it "
                            "as an `rlm-train eval` method and set train_tasks (the training task files)")
        self.constants = fit_constants(train_tasks)
        super().__init__(self._answer, name="constant")

    def constant_for(self, family: str | None, query: str) -> str:
        fitted = self.constants.get(f"{family or '-'}\t{answer_form(query)}") or self.constants.get(f"{family or '-'}\t*")
        return fitted["answer"] if fitted else ""

    def _answer(self, messages: list[dict[str, str]], call: CallContext) -> str:
        if call.role != Role.ROOT or call.depth > 0:
            return ""  # never a sub-policy: eval refuses that before it runs
        return f"FINAL({self.constant_for(call.hints.get('family'), call.query)!r})"
