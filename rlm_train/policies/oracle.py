"""The oracle sub-policy: answers the sub-prompts a solver writes from ground truth.

It stands in for a perfect sub-model, so tests can show that a task family is solvable
by the scripted teacher's programs (any failure is then the program's, not the
sub-model's). It never sees a task's answer; it reads what the prompt contains:

- instance texts (oolong/pairs): their label, from the corpus lookup (one per line,
  `N. label` where the question was numbered `N.`);
- "What is the <relation> of <entity>?" over passages (multihop): the entity named by a
  planted fact of that relation about that subject, else NONE;
- "magic number for <key>" (niah): the values of the matching needles in the prompt;
- a ```python snippet with one of the codeqa checks: the AST's answer.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlm_train.errors import UserError
from rlm_train.models.base import CallablePolicy
from rlm_train.tasks import corpora, multihop
from rlm_train.tasks.codeqa import called_names, defaults

_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):\]]|\[\d+\]|[-*•])\s*")
_NUMBER = re.compile(r"^\s*(\d+)\s*[.):]\s")
_INSTANCE = re.compile(r"Instance:\s*(.+?)\s*$")
_HOP = re.compile(r"What is (the [a-z ]+? of) (.+?)\?")
_NEEDLE_Q = re.compile(r"magic numbers? for ([\w-]+)", re.IGNORECASE)
_CODE = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


# The families whose sub-prompts `answer_prompt` knows how to look up.
ORACLE_FAMILIES = ("niah", "oolong", "pairs", "multihop", "codeqa")


def oracle_refusal(task: Mapping[str, Any]) -> str | None:
    """Why the oracle cannot stand in for a sub-model on this task, or None. It is a
    gold-label lookup over the task suite's own corpora, so it only answers tasks that
    `rlm-train tasks make` built from the corpus installed here (their `meta.corpus`)."""
    family = task.get("family")
    if family not in ORACLE_FAMILIES:
        return f"family {family!r} is not one the oracle knows ({', '.join(ORACLE_FAMILIES)})"
    from rlm_train.tasks.registry import get_family

    made_with = (task.get("meta") or {}).get("corpus")
    here = get_family(family).corpus_version()
    if made_with != here:
        return (f"its meta.corpus is {made_with!r}, not {here!r}: only tasks `rlm-train tasks make` built "
                "from the corpus installed here carry the gold labels the oracle looks up")
    return None


def refuse_oracle_tasks(who: str, tasks: Iterable[Mapping[str, Any]], task_file: str | Path) -> None:
    """UserError naming the task file and the first task the oracle cannot answer (`who`:
    what asked for the oracle, e.g. "method 'tuned' sub_policy"); before anything runs."""
    for task in tasks:
        why = oracle_refusal(task)
        if why:
            raise UserError(f"{who} is the oracle (gold-label lookup), which cannot answer task {task.get('id')!r} "
                            f"of {task_file}: {why}")


class OraclePolicy(CallablePolicy):
    """Answers sub-prompts from ground truth (see `answer_prompt`)."""

    def __init__(self):
        super().__init__(lambda messages, call: answer_prompt(messages[-1]["content"] if messages else ""), name="oracle")


def answer_prompt(prompt: str) -> str:
    """The oracle's reply to one sub-prompt (pure: the same prompt, the same reply)."""
    code = _CODE.search(prompt)
    if code:
        return _code_answer(prompt, code.group(1))
    # Instance texts first: many are themselves "What is the ... of ...?" questions.
    labels = classify_lines(prompt)
    if labels:
        return "\n".join(labels)
    hop = _HOP.search(prompt)
    if hop:
        return _hop_answer(prompt, hop.group(1), hop.group(2))
    needle = _NEEDLE_Q.search(prompt)
    if needle:
        key = re.escape(needle.group(1))
        values = list(dict.fromkeys(re.findall(rf"magic numbers? for {key} is:?\s*(\d+)", prompt)))
        return ", ".join(values) if values else "NONE"
    return "I cannot tell from this text."


def classify_lines(prompt: str) -> list[str]:
    """Labels for every line of the prompt that holds a known instance text, in order. A
    numbered line ("3. <question>") is answered "3. <label>" (numbered batches, parsed by
    number); any other line (the teacher's one question a prompt) gets a bare label."""
    lookup = corpora.label_lookup()
    out = []
    for line in prompt.splitlines():
        m = _INSTANCE.search(line)
        text = m.group(1) if m else _NUMBERING.sub("", line).strip()
        label = lookup.get(text)
        if label:
            number = _NUMBER.match(line)
            out.append(f"{number.group(1)}. {label}" if number else label)
    return out


def _hop_answer(prompt: str, phrase: str, subject: str) -> str:
    phrase = phrase.strip().lower()
    name = multihop.strip_article(subject)
    for rel in multihop.RELATIONS:
        if rel["phrase"].format(s="").strip() != phrase:
            continue
        for pattern in multihop.object_patterns(rel, name):
            m = pattern.search(prompt)
            if m:
                return m.group("o")
    return "NONE"


def _code_answer(prompt: str, code: str) -> str:
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return "I cannot parse this code."
    asked = re.search(r"`([^`\s]+)`", prompt[prompt.rfind("```") + 3 :])
    target = asked.group(1) if asked else ""
    if re.search(r"Does this code call", prompt):
        return "yes" if target in _calls(tree) else "no"
    if re.search(r"define a method named", prompt):
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        return "yes" if any(_defines(c, target) for c in classes) else "no"
    if re.search(r"default value of the parameter", prompt):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                table = defaults(node)
                if target in table:
                    return table[target]
        return "NONE"
    if re.search(r"direct base classes", prompt):
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        return ", ".join(ast.unparse(b) for b in classes[0].bases) if classes else "NONE"
    if re.search(r"module-level function named", prompt):
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        return "yes" if target in names else "no"
    return "I cannot tell from this code."


def _calls(tree: ast.AST) -> set[str]:
    return called_names(tree)


def _defines(cls: ast.ClassDef, name: str) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in cls.body)
