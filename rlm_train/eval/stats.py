"""Confidence intervals for the report, plain Python and seeded, so a report is
reproducible on any machine (no numpy or scipy).

    ci = score_interval([1, 0, 1, 1], resamples=2000, confidence=0.95, seed=0, label="m/all")
    diff = paired_bootstrap({"t1": 0, "t2": 1}, {"t1": 1, "t2": 1}, ...)  # B minus A

Which interval a cell gets: when every task's score is 0 or 1, the scores are a binomial
count and `clopper_pearson` gives the exact interval (a bootstrap of 12/12 would be the
zero-width [1, 1]); graded scores (a task's mean over samples, partial credit) get the
percentile bootstrap.

The bootstrap resampling, exactly (tests re-implement it): `rng = random.Random(f"{seed}:{label}")`;
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

EXACT = "exact"  # Clopper-Pearson, for 0/1 scores
BOOTSTRAP = "bootstrap"  # percentile bootstrap over tasks, for graded scores


def score_interval(values: Sequence[float], *, resamples: int, confidence: float, seed: int,
                   label: str) -> dict[str, Any]:
    """{"mean", "lo", "hi", "n", "interval"}: the exact binomial interval when every value is
    0 or 1, else the percentile bootstrap (`interval` says which; None without values)."""
    values = list(values)
    if values and all(v in (0.0, 1.0) for v in values):
        lo, hi = clopper_pearson(int(sum(values)), len(values), confidence)
        return {"mean": math.fsum(values) / len(values), "lo": lo, "hi": hi, "n": len(values), "interval": EXACT}
    out = bootstrap_mean(values, resamples=resamples, confidence=confidence, seed=seed, label=label)
    out["interval"] = BOOTSTRAP if values else None
    return out


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


# --------------------------------------------------------------------------- exact binomial
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no overflow for large n)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    return min(1.0, math.fsum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                              for i in range(k + 1)))


def _bisect(decreasing, target: float) -> float:
    """The p in [0, 1] where the decreasing function `decreasing(p)` crosses `target`."""
    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2**-60: below any digit a report shows
        mid = (lo + hi) / 2
        if decreasing(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion, k successes of n:
    lo is the p where P(X >= k) = alpha/2, hi the p where P(X <= k) = alpha/2 (the beta
    quantiles B(alpha/2; k, n-k+1) and B(1-alpha/2; k+1, n-k), found by bisection)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    tail = (1 - confidence) / 2
    # P(X >= k) = 1 - cdf(k - 1) grows with p; P(X <= k) = cdf(k) falls with p.
    lo = 0.0 if k == 0 else _bisect(lambda p: binomial_cdf(k - 1, n, p), 1 - tail)
    hi = 1.0 if k == n else _bisect(lambda p: binomial_cdf(k, n, p), tail)
    return lo, hi


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test of wins against losses (ties left out): for 0/1 scores this
    is McNemar's exact test on the discordant tasks. None when there is no untied task."""
    n = wins + losses
    if n == 0:
        return None
    return min(1.0, 2 * binomial_cdf(min(wins, losses), n, 0.5))


# --------------------------------------------------------------------------- paired
def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], *, resamples: int, confidence: float,
                     seed: int, label: str) -> dict[str, Any]:
    """B minus A on the tasks both scored: the mean difference and its bootstrap interval
    (tasks resampled together, so what the two methods share cancels), how many tasks B
    won, lost and tied, and the exact sign test's p-value of wins against losses."""
    keys = sorted(a.keys() & b.keys())
    diffs = [b[k] - a[k] for k in keys]
    out = bootstrap_mean(diffs, resamples=resamples, confidence=confidence, seed=seed, label=label)
    out.update(wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs), ties=sum(d == 0 for d in diffs))
    out["sign_test_p"] = sign_test_p(out["wins"], out["losses"])
    return out
