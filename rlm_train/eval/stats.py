"""Percentile bootstrap intervals, plain Python and seeded, so a report is reproducible
on any machine (no numpy: ~2000 x n draws per interval is cheap for n in the hundreds).

    ci = bootstrap_mean([1, 0, 1, 1], resamples=2000, confidence=0.95, seed=0, label="m/all")
    diff = paired_bootstrap({"t1": 0, "t2": 1}, {"t1": 1, "t2": 1}, ...)  # B minus A

The resampling, exactly (tests re-implement it): `rng = random.Random(f"{seed}:{label}")`;
each of the `resamples` draws takes n values with replacement, value i chosen as
`values[int(rng.random() * n)]` (what `rng.choices` does), and records their mean. With
the means sorted and k = floor(resamples * (1 - confidence) / 2), the interval is
[means[k], means[resamples - 1 - k]]. Each interval's stream comes from its label, so
adding a method or a family never moves another interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any


def bootstrap_mean(values: Sequence[float], *, resamples: int, confidence: float, seed: int, label: str) -> dict[str, Any]:
    """{"mean", "lo", "hi", "n"}: the mean of `values` and its percentile bootstrap interval
    (all None when there are no values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    values = list(values)
    mean = math.fsum(values) / n
    rng = random.Random(f"{seed}:{label}")
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    k = tail_index(resamples, confidence)
    return {"mean": mean, "lo": means[k], "hi": means[resamples - 1 - k], "n": n}


def tail_index(resamples: int, confidence: float) -> int:
    """How many sorted resample means each tail of the interval leaves out."""
    return min(resamples // 2, math.floor(resamples * (1 - confidence) / 2 + 1e-9))


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], *, resamples: int, confidence: float,
                     seed: int, label: str) -> dict[str, Any]:
    """B minus A on the tasks both scored: the mean difference and its bootstrap interval
    (tasks resampled together, so what the two methods share cancels), plus how many
    tasks B won, lost and tied."""
    keys = sorted(a.keys() & b.keys())
    diffs = [b[k] - a[k] for k in keys]
    out = bootstrap_mean(diffs, resamples=resamples, confidence=confidence, seed=seed, label=label)
    out.update(wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs), ties=sum(d == 0 for d in diffs))
    return out
