"""The scripted teacher's strategies, by task family name.

    from rlm_train.policies.scripted.registry import register_strategy, strategy_for
    register_strategy("toy", next_turn)     # next_turn(view: EpisodeView) -> str
    strategy_for("toy")(view)               # unknown families and child RLMs: generic

A strategy is a function from an `EpisodeView` to the next assistant turn (text with a
```repl block); a module exposing `next_turn` is accepted too. The family names are
those of `rlm_train.tasks.registry`; the built-in strategies are listed once, in
`BUILTIN` below: a new family's teacher is its own module plus one entry there.
"""

from __future__ import annotations

from typing import Any, Callable

from rlm_train.policies.scripted import codeqa, generic, multihop, niah, oolong, pairs
from rlm_train.policies.scripted.view import EpisodeView

Strategy = Callable[[EpisodeView], str]

BUILTIN: dict[str, Strategy] = {
    "niah": niah.next_turn,
    "oolong": oolong.next_turn,
    "pairs": pairs.next_turn,
    "multihop": multihop.next_turn,
    "codeqa": codeqa.next_turn,
}
FALLBACK: Strategy = generic.next_turn
"""For families without a strategy of their own, and for child RLMs."""

_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(family: str, strategy: Strategy | Any, *, replace: bool = False) -> Strategy:
    """Make the teacher use `strategy` (a `next_turn(view)` function, or a module or
    object exposing one) for episodes of task family `family`; returns the function."""
    fn = getattr(strategy, "next_turn", strategy)
    if not callable(fn):
        raise TypeError(f"strategy for {family!r} must be next_turn(view) -> str or have one, got {strategy!r}")
    if not isinstance(family, str) or not family:
        raise ValueError(f"strategy family must be a non-empty name, got {family!r}")
    if family in _STRATEGIES and not replace:
        raise ValueError(f"a scripted strategy for {family!r} is already registered; pass replace=True to replace it")
    _STRATEGIES[family] = fn
    return fn


def unregister_strategy(family: str) -> Strategy:
    return _STRATEGIES.pop(family)


def strategy_for(family: str | None) -> Strategy:
    """The strategy registered for `family`; the generic one for None or an unknown name."""
    return _STRATEGIES.get(family or "", FALLBACK)


for _family, _strategy in BUILTIN.items():
    register_strategy(_family, _strategy)
del _family, _strategy
