"""The task-family registry: family name -> `Family`, scorer name -> scorer.

    from rlm_train.tasks.registry import get_family, register_family, score
    get_family("niah").min_tokens           # 500
    register_family(Family(name="toy", generate=..., scorer="toy_exact", score=..., min_tokens=10))

The built-in families are listed once, in `BUILTIN` below: a new family is its own
module (building a `Family`) plus one entry there. Its scripted-teacher strategy is
registered the same way, by family name, in `rlm_train.policies.scripted.registry`.
"""

from __future__ import annotations

from typing import Any

from rlm_train.errors import UserError
from rlm_train.tasks import codeqa, multihop, niah, oolong, pairs
from rlm_train.tasks.family import Family, Scorer

BUILTIN: tuple[Family, ...] = (niah.FAMILY, oolong.FAMILY, pairs.FAMILY, multihop.FAMILY, codeqa.FAMILY)

_FAMILIES: dict[str, Family] = {}
_SCORERS: dict[str, Scorer] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make `family` generatable and its scorer findable by name; returns it.

    A second family of the same name is an error unless `replace`; a scorer name may be
    shared only by families that use the same scorer function."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family, got {type(family).__name__}")
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"task family {family.name!r} is already registered; pass replace=True to replace it")
    sharing = [f for f in _FAMILIES.values() if f.scorer == family.scorer and f.name != family.name]
    if sharing and sharing[0].score is not family.score:
        raise ValueError(f"scorer name {family.scorer!r} is already taken by family {sharing[0].name!r} "
                         "with another scoring function; choose another name")
    old = _FAMILIES.get(family.name)
    _FAMILIES[family.name] = family  # a replaced family keeps its place in the order
    _SCORERS[family.scorer] = family.score
    if old is not None and not any(f.scorer == old.scorer for f in _FAMILIES.values()):
        del _SCORERS[old.scorer]
    return family


def unregister_family(name: str) -> Family:
    """Remove a registered family (and its scorer, when no other family uses it)."""
    family = _FAMILIES.pop(name)
    if not any(f.scorer == family.scorer for f in _FAMILIES.values()):
        _SCORERS.pop(family.scorer, None)
    return family


def family_names() -> tuple[str, ...]:
    """Every registered family, built-ins first, in registration order."""
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise UserError(f"unknown task family {name!r}; choose one of {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def score(task: dict, answer: Any) -> float:
    """Score one answer to one task, in [0, 1], by the task's `scorer` name. Unknown
    scorers and tasks without an answer are UserErrors naming the task."""
    name = task.get("scorer")
    if name not in _SCORERS:
        raise UserError(
            f"task {task.get('id')!r}: unknown scorer {name!r}; expected one of {', '.join(_SCORERS)}"
        )
    if "answer" not in task:
        raise UserError(f"task {task.get('id')!r}: has no 'answer' field to score against")
    value = _SCORERS[name](task, answer)
    return min(1.0, max(0.0, float(value)))


for _family in BUILTIN:
    register_family(_family)
del _family
