"""Statistics of the ablation grid: paired differences over seeds with t confidence intervals.

Cells of one seed share the data order, the augmentations and the initialisation across
variants, so variant A and variant B at the same seed form a pair; the difference per seed
removes the seed's own luck, and the paired t interval is narrower than the unpaired one.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import stats


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> dict:
    """Mean of ``a[s] - b[s]`` over the seeds present (and finite) in both, with its two-sided
    t confidence interval.

    Returns ``{"n", "mean", "std", "ci_low", "ci_high", "p_value", "seeds"}``; with fewer than
    two pairs, the spread, interval and p-value are NaN.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = sorted(s for s in set(a) & set(b)
                   if math.isfinite(float(a[s])) and math.isfinite(float(b[s])))
    d = np.array([float(a[s]) - float(b[s]) for s in seeds])
    n = int(d.size)
    out = {"n": n, "mean": float(d.mean()) if n else float("nan"), "std": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"), "seeds": seeds}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
    out.update(std=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if sd > 0:
        out["p_value"] = float(stats.ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds]).pvalue)
    else:
        out["p_value"] = 0.0 if out["mean"] != 0 else 1.0
    return out
