"""A study's design targets, checked after its runs: the paired minimum detectable difference
(power) and the clean-train minus test gap (regime). Torch-free.

The pre-registered fashion-5k study (docs/preregistration-fashion-5k.md) states both before its
runs; ``msr targets`` prints them from a set's runs.csv. Only trained runs count (msr.outcome),
over the main grid (sweep ``base``), paired by seed as T3 pairs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from msr.outcome import TRAINED, chance_level, run_outcome

POWER = 0.80
ALPHA = 0.05  # two-sided


def paired_mdd(differences: Sequence[float], *, power: float = POWER, alpha: float = ALPHA) -> float:
    """The minimum detectable difference of a paired t test at ``power`` (two-sided ``alpha``)
    from the observed per-pair differences: (t(1 - alpha/2, n-1) + t(power, n-1)) x sd / sqrt(n).
    NaN with fewer than 2 pairs (no sd)."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan
    dof = n - 1
    factor = stats.t.ppf(1 - alpha / 2, dof) + stats.t.ppf(power, dof)
    return float(factor * d.std(ddof=1) / math.sqrt(n))


def _trained(runs: pd.DataFrame, variant: str) -> pd.DataFrame:
    rows = runs[(runs["variant"] == variant) & (runs["sweep"] == "base")]
    if rows.empty:
        return rows
    keep = [run_outcome(r.status, r.final_test_acc, chance_level(r.dataset)) == TRAINED
            for r in rows.itertuples()]
    return rows[keep]


def power_rows(runs: pd.DataFrame, pairs: Iterable[tuple[str, str]], *, mdd_max: float,
               power: float = POWER, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per comparison A - B: pairs (seeds where both trained), the mean and sd of the
    per-seed differences and the MDD, in pp; ``met`` when MDD <= ``mdd_max`` (pp)."""
    out = []
    for a, b in pairs:
        ta = _trained(runs, a).set_index("seed")["final_test_acc"]
        tb = _trained(runs, b).set_index("seed")["final_test_acc"]
        common = sorted(set(ta.index) & set(tb.index))
        d = (ta.loc[common] - tb.loc[common]).to_numpy(dtype=float) * 100.0
        mdd = paired_mdd(d, power=power, alpha=alpha)
        out.append({"comparison": f"{a} - {b}", "pairs": len(common),
                    "mean_pp": float(d.mean()) if len(d) else math.nan,
                    "sd_pp": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                    "mdd_pp": mdd, "target_pp": mdd_max,
                    "met": bool(math.isfinite(mdd) and mdd <= mdd_max)})
    return pd.DataFrame(out)


def gap_rows(runs: pd.DataFrame, variants: Iterable[str], *, gap_min: float) -> pd.DataFrame:
    """One row per variant: the final clean-train and test accuracy and their gap, mean (and sd
    of the gap) over trained seeds, in pp; ``met`` when the mean gap >= ``gap_min`` (pp)."""
    out = []
    for v in variants:
        t = _trained(runs, v)
        train, test = t["final_clean_train_acc"].to_numpy(float) * 100, t["final_test_acc"].to_numpy(float) * 100
        gap = train - test
        mean_gap = float(gap.mean()) if len(gap) else math.nan
        out.append({"variant": v, "seeds": len(t), "clean_train_pp": float(train.mean()) if len(t) else math.nan,
                    "test_pp": float(test.mean()) if len(t) else math.nan, "gap_pp": mean_gap,
                    "gap_sd_pp": float(gap.std(ddof=1)) if len(gap) > 1 else math.nan, "target_pp": gap_min,
                    "met": bool(math.isfinite(mean_gap) and mean_gap >= gap_min)})
    return pd.DataFrame(out)
