"""Scoring functions: pure (expected, answer) -> score in [0, 1], one per kind of answer.

An answer is what a model returned (usually a string; lists and numbers are accepted
too), and a task's own `answer` value always scores 1.0. Each family's `Family.score`
applies one of these to a task; `rlm_train.tasks.registry.score` finds that by the
task's `scorer` name.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from rlm_train.errors import UserError


def as_text(answer: Any) -> str:
    """A model answer as one string: lists are joined, None is empty."""
    if answer is None:
        return ""
    if isinstance(answer, (list, tuple)):
        return "\n".join(as_text(a) for a in answer)
    return str(answer)


# ---------------------------------------------------------------- niah


def score_all_strings(expected: Any, answer: Any) -> float:
    """RULER string_match_all: the fraction of expected strings that appear in the answer
    (case-insensitive); 1.0 exactly when every one does."""
    wanted = [expected] if isinstance(expected, str) else list(expected)
    text = as_text(answer).lower()
    if not wanted:
        return 1.0
    return sum(1.0 for w in wanted if str(w).lower() in text) / len(wanted)


# ---------------------------------------------------------------- oolong

_INT_RE = re.compile(r"-?\d[\d,]*")


def parse_number(answer: Any) -> int | None:
    """The number an answer gives: the whole answer if numeric, else its last integer
    ("There are 23 such instances" -> 23); None when it has no number."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return int(answer)
    found = _INT_RE.findall(as_text(answer))
    if not found:
        return None
    return int(found[-1].replace(",", ""))


def _norm_label(text: str) -> str:
    return re.sub(r"[^a-z]+", " ", text.lower()).strip()


def parse_label(answer: Any, labels: list[str]) -> str | None:
    """The label an answer names: the whole answer, else the only label word in it.
    An answer naming two or more different labels names none."""
    text = _norm_label(as_text(answer))
    if text in labels:
        return text
    named = {label for label in labels if re.search(rf"\b{re.escape(label)}\b", text)}
    return named.pop() if len(named) == 1 else None


def score_oolong(expected: Any, answer: Any, labels: list[str]) -> float:
    """Labels: exact match (after parse_label). Numbers: 0.75 ** |error| (OOLONG)."""
    if isinstance(expected, bool) or not isinstance(expected, (int, str)):
        raise UserError(f"oolong task answer must be an int or a label, got {expected!r}")
    if isinstance(expected, int):
        got = parse_number(answer)
        return 0.0 if got is None else 0.75 ** abs(got - expected)
    return 1.0 if parse_label(answer, labels) == expected else 0.0


# ---------------------------------------------------------------- pairs

_PAIR_RE = re.compile(r"(\d+)\s*[,;&/\-]\s*(\d+)|(\d+)\s+and\s+(\d+)")


def parse_pairs(answer: Any) -> set[tuple[int, int]]:
    """Unordered id pairs in an answer: "(12, 34)" lines, "12-34", nested lists.
    Duplicates and reversed duplicates count once; a pair of an id with itself is dropped."""
    pairs: set[tuple[int, int]] = set()
    if isinstance(answer, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in answer):
        raw = [(int(a), int(b)) for a, b in answer]
    else:
        raw = []
        for m in _PAIR_RE.finditer(as_text(answer)):
            a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            raw.append((int(a), int(b)))
    for a, b in raw:
        if a != b:
            pairs.add((min(a, b), max(a, b)))
    return pairs


def f1(predicted: set, gold: set) -> float:
    if not predicted and not gold:
        return 1.0
    hits = len(predicted & gold)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_pairs(expected: Any, answer: Any) -> float:
    """F1 between the answer's pairs and the expected pairs (both unordered sets)."""
    return f1(parse_pairs(answer), parse_pairs(expected))


# ---------------------------------------------------------------- multihop


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, articles and extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(expected: str, answer: Any) -> float:
    return 1.0 if normalize_answer(as_text(answer)) == normalize_answer(expected) else 0.0


def token_f1(expected: str, answer: Any) -> float:
    got = normalize_answer(as_text(answer)).split()
    want = normalize_answer(expected).split()
    if not got or not want:
        return 1.0 if got == want else 0.0
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def score_multihop(expected: Any, answer: Any) -> float:
    """Normalized exact match gives 1.0; otherwise token F1 (partial credit for extra words)."""
    return max(exact_match(str(expected), answer), token_f1(str(expected), answer))


# ---------------------------------------------------------------- codeqa

_MCQ_RE = re.compile(r"correct answer is\s*:?\s*\(?\s*([A-D])\s*\)?(?![A-Za-z])", re.IGNORECASE)
_BARE_RE = re.compile(r"\s*\(?\s*([A-D])\s*\)?\s*\.?\s*")


def parse_choice(answer: Any) -> str | None:
    """LongBench-v2: the letter in the first "The correct answer is (X)"; a bare "X" or
    "(X)" answer also counts. Anything else is no choice."""
    text = as_text(answer)
    m = _MCQ_RE.search(text)
    if m:
        return m.group(1).upper()
    m = _BARE_RE.fullmatch(text)
    return m.group(1) if m else None


def score_mcq(expected: Any, answer: Any) -> float:
    return 1.0 if parse_choice(answer) == parse_choice(expected) else 0.0
