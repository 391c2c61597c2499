"""The verdict rule of the report's "Does similarity transfer help?" section, and how many pairs
a conclusive answer needs. Pure functions of numbers (scipy.stats only).

* :func:`verdict` - from paired differences (variant a - variant b per seed / split) and the
  number of comparisons the report states: ``resolved_up`` / ``resolved_down`` (the
  Bonferroni-corrected confidence interval excludes 0), ``equivalent`` (it lies inside
  ``± margin``, 2 points by default: no difference that matters), or ``unresolved``.
* :func:`pairs_for_power` - the number of pairs a paired t-test needs to detect an effect
  (3 points by default) with 80 % power, from a pilot's paired standard deviation.
* :func:`sign_test` - per-class differences: how many classes go up and down, with the exact
  two-sided binomial test (ties dropped).
* :func:`between_splits` - paired differences grouped by base/novel split: does the effect vary
  from split to split more than the pairs of one split vary (one-way ANOVA, ``scipy.stats.f_oneway``)?
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
from scipy import stats

VERDICTS = ("resolved_up", "resolved_down", "equivalent", "unresolved")
EQUIVALENCE_MARGIN = 2.0        # points: an interval inside ±2 is "no difference that matters"
TARGET_EFFECT = 3.0             # points: the effect the sample-size function plans for
TARGET_POWER = 0.8


def _finite(values: Iterable[float]) -> np.ndarray:
    d = np.asarray([float(v) for v in values], dtype=np.float64)
    return d[np.isfinite(d)]


def verdict(diffs: Iterable[float], comparisons: int = 1, margin: float = EQUIVALENCE_MARGIN,
            confidence: float = 0.95) -> dict:
    """The verdict on paired differences ``diffs`` (non-finite values left out).

    The interval is the two-sided t interval of the mean (n - 1 degrees of freedom) at the
    Bonferroni-corrected level ``1 - (1 - confidence) / comparisons`` (``comparisons``: how many
    such verdicts the report states). In order:

    * ``resolved_up`` - the interval lies above 0; ``resolved_down`` - below 0 (a resolved effect
      smaller than ``margin`` is still resolved: ``within_margin`` then says so);
    * ``equivalent`` - the interval contains 0 and lies inside ``[-margin, margin]``;
    * ``unresolved`` - anything else, and always with fewer than 2 pairs.

    Returns ``{"verdict", "n", "mean", "sd", "ci_low", "ci_high", "level", "comparisons", "margin",
    "within_margin"}`` (NaN where undefined).
    """
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = _finite(diffs)
    n = int(d.size)
    level = 1.0 - (1.0 - confidence) / comparisons
    out = {"verdict": "unresolved", "n": n, "mean": float(d.mean()) if n else float("nan"), "sd": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "level": level, "comparisons": int(comparisons),
           "margin": float(margin), "within_margin": False}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    lo, hi = out["mean"] - half, out["mean"] + half
    out.update(sd=sd, ci_low=lo, ci_high=hi, within_margin=bool(-margin <= lo and hi <= margin))
    if lo > 0:
        out["verdict"] = "resolved_up"
    elif hi < 0:
        out["verdict"] = "resolved_down"
    elif out["within_margin"]:
        out["verdict"] = "equivalent"
    return out


def paired_power(n: int, sd: float, effect: float = TARGET_EFFECT, alpha: float = 0.05,
                 comparisons: int = 1) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs at level ``alpha / comparisons`` against a
    true mean difference ``effect`` with paired standard deviation ``sd`` (noncentral t)."""
    if n < 2:
        return float("nan")
    a, df = alpha / comparisons, n - 1
    crit = float(stats.t.ppf(1.0 - a / 2.0, df))
    nc = effect * math.sqrt(n) / sd
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def pairs_for_power(sd: float, effect: float = TARGET_EFFECT, power: float = TARGET_POWER, alpha: float = 0.05,
                    comparisons: int = 1, max_n: int = 1_000_000) -> int:
    """The smallest number of pairs (>= 2) for which the two-sided paired t-test at level
    ``alpha / comparisons`` (Bonferroni) has at least ``power`` against a true difference ``effect``,
    given the paired standard deviation ``sd`` (a pilot's). E.g. ``sd`` = ``effect`` (a standardised
    effect of 1) needs 10 pairs, ``sd`` = 2 x ``effect`` needs 34 (alpha 0.05, power 0.8)."""
    if not (sd >= 0 and math.isfinite(sd)) or effect <= 0 or not 0 < power < 1:
        raise ValueError(f"pairs_for_power: need a finite sd >= 0, effect > 0 and power in (0, 1); got sd={sd}, "
                         f"effect={effect}, power={power}")
    if sd == 0:
        return 2
    a = alpha / comparisons
    z = stats.norm.ppf(1.0 - a / 2.0) + stats.norm.ppf(power)
    n = max(2, int((z * sd / effect) ** 2))          # the normal approximation never overshoots the t answer
    while paired_power(n, sd, effect, alpha, comparisons) < power:
        n += 1
        if n > max_n:
            raise ValueError(f"pairs_for_power: more than {max_n} pairs needed (sd {sd}, effect {effect})")
    return n


def sign_test(diffs: Iterable[float]) -> dict:
    """Per-class differences: ``{"up", "down", "ties", "p_value"}``, ``p_value`` the exact two-sided
    binomial test of ``up`` out of ``up + down`` against 1/2 (NaN with no untied class)."""
    d = _finite(diffs)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    p = float(stats.binomtest(up, up + down, 0.5).pvalue) if up + down else float("nan")
    return {"up": up, "down": down, "ties": int(d.size - up - down), "p_value": p}


def between_splits(groups: Mapping[object, Iterable[float]]) -> dict:
    """Paired differences grouped by split (``{split: [a - b per seed]}``, non-finite values left
    out): per split ``n``, ``mean``, ``sd`` (ddof 1; NaN with one pair) and ``up`` (pairs above 0),
    and the one-way ANOVA of the differences across splits (``scipy.stats.f_oneway``): ``F`` and
    ``p_value``, with ``df_between`` = splits - 1 and ``df_within`` = pairs - splits. The test needs
    at least 2 splits of at least 2 pairs each (splits with fewer pairs are left out of it); else
    ``F`` and ``p_value`` are NaN. Returns ``{"splits": [{"split", "n", "mean", "sd", "up"}], "F",
    "p_value", "df_between", "df_within"}``."""
    rows, tested = [], []
    for split, values in groups.items():
        d = _finite(values)
        if not d.size:
            continue
        rows.append({"split": split, "n": int(d.size), "mean": float(d.mean()),
                     "sd": float(d.std(ddof=1)) if d.size > 1 else float("nan"), "up": int((d > 0).sum())})
        if d.size >= 2:
            tested.append(d)
    out = {"splits": rows, "F": float("nan"), "p_value": float("nan"), "df_between": 0, "df_within": 0}
    if len(tested) >= 2:
        res = stats.f_oneway(*tested)
        out.update(F=float(res.statistic), p_value=float(res.pvalue), df_between=len(tested) - 1,
                   df_within=int(sum(d.size for d in tested)) - len(tested))
    return out
