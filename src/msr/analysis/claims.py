"""The paper's claims judged from the runs: statistics, the verdict rule, and table T3.

Every claim gets a verdict per dataset and arch by ONE rule, stated here, printed under the
table (:data:`RULES`) and in docs/method.md ("Claims and verdicts"). The verdicts:

- ``supported``;
- ``contradicted``: the CI lies wholly on the wrong side of 0, OR the claim predicts a
  difference ("better", "does not reach") and the two sides are equivalent: the whole CI lies
  strictly inside [-m, +m] (m: the dataset's margin, default 0.5 pp);
- ``inconclusive`` (``inconclusive (n = k)`` when too few seeds could be compared);
- ``baseline failed to train``: a side that cannot fit its own training data proves nothing;
- ``by construction``: a property the code guarantees, reported as a fact, not as evidence.

**Failure** (one definition everywhere, :func:`run_outcome`, :func:`failure_threshold`): a run
FAILS when it diverged (status ``diverged``: non-finite loss) or ended at chance, i.e. below
``chance + FAIL_FRACTION x (1 - chance)`` final test accuracy (55% for 10 classes). Every other
run TRAINED. Means and tests use the runs that trained; each side's runs are counted as
trained / diverged / at chance beside them, nothing is dropped silently, and where the failure
rates of two sides differ, Fisher's exact test (two-sided) is reported.

**Accuracy claims** (2 vs ``nf``, 4, 5, 6), A - B of final test accuracy, checked in order:

1. a variant without runs -> ``inconclusive (n = 0)``;
2. a side FAILED TO TRAIN when fewer than half of its runs reach the failure threshold in final
   CLEAN TRAIN accuracy (``final_clean_train_acc``; a diverged run never reaches it) ->
   ``baseline failed to train`` (judged before the seed count: such a side proves nothing however
   many seeds it has);
3. PAIRING: main-grid runs of two variants with the same seed share the data order (``x`` and
   ``x_noise`` also share the init: ``shares_init``, :data:`SHARES_INIT`), so when both sides ran
   the same seeds the comparison is PAIRED on the seeds where BOTH trained: t with n - 1 df on
   the per-seed differences. Sides with different seed sets fall back to UNPAIRED Welch t over
   each side's trained runs. Fewer than :data:`MIN_SEEDS` (3) pairs (unpaired: trained runs on
   the smaller side) -> ``inconclusive (n = k)``;
4. the 95% t CI decides (its p enters Holm). Intervals are clipped to the feasible range
   ([-100, +100] pp for accuracy, [-1, 1] for rates) and the method says so. The CI strictly
   inside [-m, m] -> ``contradicted`` (equivalent; for a "below" claim such as 6 "does not reach
   BatchNorm" this means the peer does reach it within the margin), p = TOST's (the larger of
   the two one-sided p); else the CI wholly on the predicted side -> ``supported``, wholly on
   the other side -> ``contradicted``, touching or spanning 0 -> ``inconclusive``, p = the
   TWO-SIDED t test of 0 (two-sided, so that one test can support or contradict). With n >=
   :data:`SIGNFLIP_MIN_N` (6) pairs the exact sign-flip (permutation) interval (Hartigan's
   subset means; Monte Carlo above 16 pairs) is reported too and must AGREE: a verdict whose
   sign-flip interval does not give the same verdict is ``inconclusive``. (The sign-flip p
   cannot fall below 2 / 2^n, 0.031 at n = 6: letting it decide under Holm would make a
   verdict impossible with 6 seeds and possible with 5.)
5. survivors never carry a verdict: when the side a verdict favours (``supported``: the side
   the claim predicts better; ``contradicted``: the other) failed more often than the other
   side, the row is ``inconclusive`` (its mean is of its survivors);
6. Holm's step-down correction over the rows of one claim per dataset/arch that ran a test
   (claim 4: 2 rows, claim 6: 3, others 1): a ``supported``/``contradicted`` verdict stands only
   when its Holm-adjusted p is <= :data:`ALPHA` (0.05); otherwise ``inconclusive``.

**Learning-rate sweep** (claims 1 and 2): the main grid's runs plus the ``lr`` sweep's, keyed
by ``lr_factor`` (the sweep point as a factor of each variant's own default lr, every param
group scaled together; 1.0 for the main grid) when runs.csv has it, else by the absolute ``lr``
(the row says which). A point is STABLE for a variant when it has at least ``min_sweep_seeds``
runs (:data:`MIN_SWEEP_SEEDS` = 2 by default: a sweep point is a yes/no screen, not a mean) and
every one of them trained; with fewer runs it is not judged. Only points judged for every
compared variant count.

- Claim 1 (``plain`` vs ``bn``): ``supported`` when ``plain`` is stable at some point and fails
  at a higher point where ``bn`` is stable; ``contradicted`` when ``plain`` is stable wherever
  ``bn`` is; ``inconclusive`` when ``plain`` fails at EVERY lr tried ("initialization, not lr",
  with the step it diverges at: median and range of ``diverged_at_step``), when ``bn`` is
  stable nowhere, or when a sweep is missing. The pooled failure-rate difference (Newcombe
  interval, Fisher's p) is shown. "Mean shift at init" (``plain`` - ``msr``, deepest conv, step
  0 probes) is a measured fact: ``by construction`` (zero-mean init guarantees it; a CI
  wholly below 0 would contradict the construction: a bug).
- Claim 2 (``msr`` vs ``bn``, ``plain``): the highest stable point, and the widest contiguous
  run of stable points in octaves (log2 highest / lowest of the run; one point: 0). Both must
  be >= ``bn``'s and > ``plain``'s for ``supported``; either below ``bn``'s or ``plain``'s ->
  ``contradicted``; otherwise (a tie with ``plain``, e.g. both stable at the top of the sweep)
  ``inconclusive``. ``msr`` - ``nf`` accuracy is judged as an accuracy claim.

**Claim 3** (the test graph is the training graph): ``msr`` has no layer that depends on
train/eval mode: ``by construction`` (a measured max |train - eval output| is shown; one above
tolerance would contradict the construction). ``msr_noise``: its eval output equals the
train-mode output of the same weights with the noise disabled (``noise_delta=0``),
:func:`train_eval_difference` with ``train_overrides``; ``supported`` within
:data:`IDENTITY_TOL` of the largest output, ``contradicted`` above it, ``inconclusive`` unless
the ``bn`` control (train vs eval output) shows a difference the test can see.

Imports no torch at module level; :func:`train_eval_difference` imports it when called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from msr import catalog
from msr.analysis.aggregate import depth_of_arch
from msr.outcome import (
    AT_CHANCE,
    DIVERGED,
    FAIL_FRACTION,
    TRAINED,
    chance_level,
    failure_threshold,
    run_outcome,
)

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
BASELINE_FAILED, BY_CONSTRUCTION = "baseline failed to train", "by construction"
CONFIDENCE = 0.95
ALPHA = 1.0 - CONFIDENCE  # a verdict from a test needs a Holm-adjusted p <= ALPHA
MIN_SEEDS = 3  # seeds (pairs) a comparison needs; fewer: "inconclusive (n = k)"
MIN_SWEEP_SEEDS = 2  # runs a sweep point needs to be judged stable or not (claims 1-2)
SIGNFLIP_MIN_N = 6  # from 6 pairs the exact sign-flip interval exists at 95% (2/64 < 0.05)
SIGNFLIP_EXACT_MAX = 16  # up to 2^16 sign vectors enumerated; above, Monte Carlo draws
SIGNFLIP_DRAWS = 2**16
DEFAULT_MARGIN = 0.005  # equivalence margin in accuracy units (0.5 pp), per dataset via margins=
# Claim 3: outputs count as identical within this fraction of the largest |output|.
IDENTITY_TOL = 1e-6
# claim 6 ("weight normalization and init-only schemes do not"): the variants the catalog files under it
PEERS_CLAIM6 = tuple(name for name, claim in catalog.VARIANT_CLAIMS.items() if claim == "6")
# Pairs (A, B) whose runs with the same seed also share the init: the noise module holds no
# parameters, so x and x_noise build the same weights from torch.manual_seed(seed).
SHARES_INIT = frozenset({("msr_noise", "msr"), ("bn_noise", "bn")})

Expect = Literal["above", "below"]

RULES = (
    f"Failure: a run fails when it diverged or ended below chance + {FAIL_FRACTION:g} x "
    f"(1 - chance) final test accuracy; means and tests use the runs that trained, the counts "
    f"(trained / diverged / at chance) stand beside them, with Fisher's exact test where the "
    f"failure rates differ.",
    f"Accuracy claims (A - B, pp): a side whose runs mostly stay under the same threshold in "
    f"final clean train accuracy -> baseline failed to train; runs of the same seed are paired "
    f"(t with n - 1 df on per-seed differences over seeds where both trained; Welch t, "
    f"unpaired, when the seed sets differ); fewer than {MIN_SEEDS} pairs -> inconclusive (n = k).",
    f"{CONFIDENCE:.0%} t CI (clipped to the feasible range) and its p decide; from "
    f"{SIGNFLIP_MIN_N} pairs the exact sign-flip interval is shown and must give the same "
    f"verdict, else inconclusive.",
    "CI strictly inside [-m, +m] (m: the dataset's margin) -> contradicted (equivalent, p = "
    "TOST); else wholly on the predicted side -> supported, on the other side -> contradicted, "
    "touching or spanning 0 -> inconclusive (p two-sided).",
    "A verdict favouring the side that failed more often is inconclusive (survivors); a "
    f"supported/contradicted verdict needs its Holm-adjusted p (over the rows of one claim) "
    f"<= {ALPHA:.2g}.",
    f"Claims 1-2 (lr sweep, by lr factor of each variant's default, else absolute lr): a point "
    f"is stable when all its runs (>= the sweep minimum, {MIN_SWEEP_SEEDS} by default) trained. "
    "Claim 1: plain stable at some lr and failing at a higher one where bn is stable; failing "
    "at every lr is initialization, not lr (inconclusive). Claim 2: msr's highest stable point "
    "and widest stable range (octaves) >= bn's and > plain's.",
    "By construction (a fact, not evidence): the mean shift at init of plain vs msr (zero-mean "
    "init) and msr's train/eval independence. Claim 3 measured: msr_noise's eval output equals "
    "its train-mode output without noise; bn is the control that shows a difference.",
)


def outcomes(runs: pd.DataFrame, chance: float | pd.Series) -> pd.Series:
    """:func:`run_outcome` of every row of ``runs`` (runs.csv rows; ``chance``: one number or
    one per row), for tables and figures that must count failures the same way."""
    chances = chance if isinstance(chance, pd.Series) else pd.Series(chance, index=runs.index)
    return pd.Series([run_outcome(s, a, c) for s, a, c in
                      zip(runs["status"], runs["final_test_acc"], chances, strict=True)],
                     index=runs.index, dtype=object)


@dataclass(frozen=True)
class Run:
    """One run's outcome, as a comparison needs it."""

    seed: int | None
    outcome: str
    acc: float  # final test accuracy (NaN for a diverged run)
    fits: bool  # final clean train accuracy reached failure_threshold
    diverged_at: float = math.nan


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a variant's runs at one grid point."""

    name: str
    runs: tuple[Run, ...] = ()
    threshold: float = math.nan  # the failure threshold these runs were judged by

    @classmethod
    def of(cls, name: str, values: Sequence[float] = (), *, diverged: int = 0, at_chance: int = 0,
           seeds: Sequence[int] | None = None, unfit: int = 0) -> Side:
        """A side from numbers (tests, examples): trained runs with ``values``, then ``diverged``
        and ``at_chance`` failures; ``seeds`` in that order (default 0, 1, ...). The failures do
        not fit their training data; so do the first ``unfit`` trained runs."""
        n = len(values) + diverged + at_chance
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} runs")
        runs = [Run(s, TRAINED, float(v), i >= unfit) for i, (s, v) in enumerate(zip(seeds, values, strict=False))]
        rest = seeds[len(values):]
        runs += [Run(s, DIVERGED, math.nan, False) for s in rest[:diverged]]
        runs += [Run(s, AT_CHANCE, 0.1, False) for s in rest[diverged:]]
        return cls(name, tuple(runs))

    def _count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.runs)

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    @property
    def n_trained(self) -> int:
        return self._count(TRAINED)

    @property
    def n_diverged(self) -> int:
        return self._count(DIVERGED)

    @property
    def n_at_chance(self) -> int:
        return self._count(AT_CHANCE)

    @property
    def n_failed(self) -> int:
        return self.n_runs - self.n_trained

    @property
    def failure_rate(self) -> float:
        return self.n_failed / self.n_runs if self.runs else math.nan

    @property
    def values(self) -> tuple[float, ...]:
        """Final test accuracy of the runs that trained."""
        return tuple(r.acc for r in self.runs if r.outcome == TRAINED)

    @property
    def seeds(self) -> tuple:
        return tuple(r.seed for r in self.runs)

    def trained_by_seed(self) -> dict:
        return {r.seed: r.acc for r in self.runs if r.outcome == TRAINED}

    @property
    def failed_to_train(self) -> bool:
        """Fewer than half of the runs reach the threshold in final clean train accuracy."""
        return bool(self.runs) and 2 * sum(r.fits for r in self.runs) < self.n_runs

    def counts_text(self) -> str:
        """'5 (1 div., 1 at chance)'."""
        extra = [f"{k} {w}" for k, w in ((self.n_diverged, "div."), (self.n_at_chance, "at chance")) if k]
        return f"{self.n_runs}" + (f" ({', '.join(extra)})" if extra else "")

    def failures_text(self) -> str:
        return f"{self.n_failed}/{self.n_runs}"

    def diverged_steps(self) -> list[float]:
        return [r.diverged_at for r in self.runs if r.outcome == DIVERGED and math.isfinite(r.diverged_at)]


def side_of(runs: pd.DataFrame, name: str, chance: float) -> Side:
    """The :class:`Side` of ``runs`` (already selected to one variant at one grid point)."""
    if runs.empty:
        return Side(name, (), failure_threshold(chance))
    if "final_clean_train_acc" not in runs.columns:
        raise ValueError("runs.csv has no final_clean_train_acc column (msr aggregate writes it): "
                         "'failed to train' cannot be judged")
    threshold = failure_threshold(chance)
    out = []
    for row in runs.to_dict("records"):
        outcome = run_outcome(row["status"], row.get("final_test_acc"), chance)
        clean = _num(row.get("final_clean_train_acc"))
        seed = row.get("seed")
        seed = int(seed) if seed is not None and _num(seed) == _num(seed) else None
        out.append(Run(seed, outcome, _num(row.get("final_test_acc")) if outcome != DIVERGED else math.nan,
                       outcome != DIVERGED and math.isfinite(clean) and clean >= threshold,
                       _num(row.get("diverged_at_step"))))
    return Side(name, tuple(out), threshold)


def _num(value) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Interval:
    """An effect (A - B) with its confidence interval, its two-sided p-value for 0 and, when a
    margin was given, the TOST p-value of equivalence within +-margin."""

    effect: float
    low: float
    high: float
    method: str
    p: float = math.nan
    p_tost: float = math.nan
    n: int = 0


def _t_stats(effect: float, se: float, dof: float, margin: float | None, confidence: float,
             method: str, n: int) -> Interval:
    from scipy import stats

    if se == 0.0 or not math.isfinite(dof):  # every difference equal: a point, decided exactly
        p = 0.0 if effect != 0 else 1.0
        p_tost = math.nan if margin is None else (0.0 if abs(effect) < margin else 1.0)
        return Interval(effect, effect, effect, method, p, p_tost, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(effect) / se, dof))
    p_tost = math.nan
    if margin is not None:
        p_tost = max(float(stats.t.sf((effect + margin) / se, dof)),  # H0: effect <= -m
                     float(stats.t.cdf((effect - margin) / se, dof)))  # H0: effect >= +m
    return Interval(effect, effect - half, effect + half, method, min(1.0, p), p_tost, n)


def paired_t(a: Sequence[float], b: Sequence[float], *, margin: float | None = None,
             confidence: float = CONFIDENCE) -> Interval:
    """Mean of the paired differences a_i - b_i with the t interval (n - 1 df), the two-sided
    p-value (= scipy.stats.ttest_rel) and, given ``margin``, TOST's p."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        raise ValueError(f"a paired t interval needs >= 2 pairs, got {d.size}")
    sd = 0.0 if np.ptp(d) == 0 else float(d.std(ddof=1))
    return _t_stats(float(d.mean()), sd / math.sqrt(d.size), d.size - 1, margin, confidence,
                    "paired t", int(d.size))


def welch_t(a: Sequence[float], b: Sequence[float], *, margin: float | None = None,
            confidence: float = CONFIDENCE) -> Interval:
    """Mean(a) - mean(b) with Welch's t interval (Welch-Satterthwaite df), two-sided p (=
    scipy.stats.ttest_ind(equal_var=False)) and, given ``margin``, TOST's p."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"Welch's interval needs >= 2 values per side, got {x.size} and {y.size}")
    va, vb = ((0.0 if np.ptp(v) == 0 else v.var(ddof=1) / v.size) for v in (x, y))
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1)) if se else math.inf
    return _t_stats(float(x.mean() - y.mean()), se, dof, margin, confidence, "Welch t",
                    int(min(x.size, y.size)))


welch_interval = welch_t  # the name the first version used


def signflip(d: Sequence[float], *, margin: float | None = None, confidence: float = CONFIDENCE,
             exact_max: int = SIGNFLIP_EXACT_MAX, draws: int = SIGNFLIP_DRAWS, seed: int = 0) -> Interval:
    """The sign-flip (permutation) test of the mean of paired differences ``d``, inverted into
    an equal-tailed interval.

    Flipping the signs of a subset F of the differences (d_i - delta) gives a sum at least the
    observed one exactly when the mean of d over F is <= delta, so the one-sided p-values are
    p_up(delta) = (1 + #{F: mean_F <= delta}) / 2^n and p_down(delta) = (1 + #{F: mean_F >=
    delta}) / 2^n, and the interval is [K-th smallest, K-th largest] subset mean with K =
    floor(alpha/2 x 2^n) (Hartigan 1969): exact for symmetric differences; it exists from
    n = 6 at 95% (for n = 6: [min d, max d]). Above ``exact_max`` differences, ``draws`` random
    subsets (seeded) stand in for all of them. p: two-sided, 2 min(p_up(0), p_down(0));
    p_tost: max(p_up(-m), p_down(m))."""
    d = np.asarray(d, dtype=float)
    n = int(d.size)
    if n <= exact_max:
        masks = ((np.arange(1, 2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
        total, method = 2**n, "sign-flip exact"
    else:
        masks = np.random.default_rng(seed).random((draws, n)) < 0.5
        masks = masks[masks.any(axis=1)]
        total, method = masks.shape[0] + 1, f"sign-flip Monte Carlo ({draws} draws)"
    means = np.sort((masks @ d) / masks.sum(axis=1))
    k = math.floor((1 - confidence) / 2 * total + 1e-9)
    if k < 1:
        raise ValueError(f"a {confidence:.0%} sign-flip interval needs >= {SIGNFLIP_MIN_N} "
                         f"differences, got {n}")

    def p_up(delta: float) -> float:
        return (1 + int(np.searchsorted(means, delta, side="right"))) / total

    def p_down(delta: float) -> float:
        return (1 + means.size - int(np.searchsorted(means, delta, side="left"))) / total

    p = min(1.0, 2 * min(p_up(0.0), p_down(0.0)))
    p_tost = math.nan if margin is None else max(p_up(-margin), p_down(margin))
    return Interval(float(d.mean()), float(means[k - 1]), float(means[-k]), method, p, p_tost, n)


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not in the family):
    sorted ascending, adj_(i) = max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (idx.size - rank) * p[i]))
        out[i] = running
    return out


def fisher_failures(a: Side, b: Side) -> float:
    """Fisher's exact test (two-sided) of the failure rates of two sides, where they differ;
    NaN where they are equal or a side has no runs."""
    if not a.runs or not b.runs or a.n_failed * b.n_runs == b.n_failed * a.n_runs:
        return math.nan
    from scipy import stats

    return float(stats.fisher_exact([[a.n_failed, a.n_trained], [b.n_failed, b.n_trained]]).pvalue)


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    from scipy import stats

    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_difference(k_a: int, n_a: int, k_b: int, n_b: int, confidence: float = CONFIDENCE) -> Interval:
    """k_a/n_a - k_b/n_b with Newcombe's hybrid score interval (from two Wilson intervals),
    clipped to [-1, 1]."""
    if n_a == 0 or n_b == 0:
        raise ValueError(f"a rate needs at least one run per side, got n={n_a} and n={n_b}")
    pa, pb = k_a / n_a, k_b / n_b
    la, ua = wilson_interval(k_a, n_a, confidence)
    lb, ub = wilson_interval(k_b, n_b, confidence)
    d = pa - pb
    low = max(-1.0, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2))
    high = min(1.0, d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2))
    return Interval(d, low, high, "Newcombe score")


def clip(interval: Interval, low: float = -1.0, high: float = 1.0) -> tuple[Interval, bool]:
    """The interval clipped to the feasible range [low, high], and whether it had to be."""
    lo, hi = max(low, interval.low), min(high, interval.high)
    clipped = (lo, hi) != (interval.low, interval.high)
    return replace(interval, low=lo, high=hi), clipped


# --------------------------------------------------------------------------------------------
# The verdict rule


def inconclusive_n(k: int) -> str:
    return f"{INCONCLUSIVE} (n = {k})"


def verdict(low: float, high: float, expect: Expect, margin: float = 0.0) -> str:
    """THE rule for a CI [low, high] of A - B: strictly inside [-margin, +margin] ->
    ``contradicted`` (equivalent, where the claim predicts a difference); else strictly on the
    side of 0 ``expect`` names -> ``supported``; strictly on the other side -> ``contradicted``;
    touching or spanning 0, or not a number -> ``inconclusive``."""
    return _geometry(low, high, expect, margin)[0]


def _geometry(low: float, high: float, expect: str, margin: float) -> tuple[str, str]:
    """(verdict, why): why in {"equivalent", "predicted side", "wrong side", "spans 0"}."""
    if expect not in ("above", "below"):
        raise ValueError(f"expect must be 'above' or 'below', got {expect!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE, "not a number"
    if -margin < low and high < margin:
        return CONTRADICTED, "equivalent"
    above, below = low > 0, high < 0
    if (above and expect == "above") or (below and expect == "below"):
        return SUPPORTED, "predicted side"
    if above or below:
        return CONTRADICTED, "wrong side"
    return INCONCLUSIVE, "touches 0" if 0.0 in (low, high) else "spans 0"


@dataclass(frozen=True)
class Judgement:
    """One row of T3. ``pre_verdict``/``pre_reason``: the verdict before Holm's correction
    (:func:`apply_holm` derives ``verdict``/``reason`` from them and ``p_holm``)."""

    claim: str
    comparison: str
    verdict: str
    reason: str
    expect: str = ""
    effect: float = math.nan
    low: float = math.nan
    high: float = math.nan
    unit: str = ""
    method: str = ""
    a: Side | None = None
    b: Side | None = None
    pairing: str = ""  # "paired" / "unpaired" / ""
    shares_init: bool | None = None
    n_test: int | None = None  # pairs (paired) or trained runs of the smaller side (unpaired)
    clipped: bool | None = None
    t_low: float = math.nan
    t_high: float = math.nan
    alt_low: float = math.nan  # sign-flip interval (n >= 6 pairs)
    alt_high: float = math.nan
    margin: float = math.nan
    p: float = math.nan
    p_test: str = ""
    p_holm: float = math.nan
    holm_m: int | None = None
    fisher_p: float = math.nan
    pre_verdict: str = ""
    pre_reason: str = ""
    detail: str = ""
    seeds: str = ""
    context: dict = field(default_factory=dict)  # dataset, arch

    def seeds_text(self) -> str:
        if self.seeds or self.a is None or self.b is None:
            return self.seeds
        return f"{self.a.counts_text()} / {self.b.counts_text()}"

    def row(self) -> dict:
        scale = 100.0 if self.unit == "pp" else 1.0

        def side(g: Side | None, attr: str):
            return getattr(g, attr) if g is not None else None

        return {
            **self.context, "claim": self.claim, "comparison": self.comparison, "expected": self.expect,
            "a": side(self.a, "name"), "n_a": side(self.a, "n_runs"), "trained_a": side(self.a, "n_trained"),
            "diverged_a": side(self.a, "n_diverged"), "at_chance_a": side(self.a, "n_at_chance"),
            "b": side(self.b, "name"), "n_b": side(self.b, "n_runs"), "trained_b": side(self.b, "n_trained"),
            "diverged_b": side(self.b, "n_diverged"), "at_chance_b": side(self.b, "n_at_chance"),
            "pairing": self.pairing, "shares_init": self.shares_init, "n_test": self.n_test,
            "effect": self.effect * scale, "ci_low": self.low * scale, "ci_high": self.high * scale,
            "ci_method": self.method, "ci_clipped": self.clipped,
            "t_low": self.t_low * scale, "t_high": self.t_high * scale,
            "alt_low": self.alt_low * scale, "alt_high": self.alt_high * scale,
            "unit": self.unit, "margin": self.margin * scale, "p": self.p, "p_test": self.p_test,
            "p_holm": self.p_holm, "holm_m": self.holm_m, "fisher_p": self.fisher_p,
            "verdict": self.verdict, "reason": self.reason, "detail": self.detail,
            "seeds": self.seeds_text(),
        }


COUNT_COLUMNS = ("n_a", "trained_a", "diverged_a", "at_chance_a", "n_b", "trained_b", "diverged_b",
                 "at_chance_b", "n_test", "holm_m")


def _fmt_p(p: float) -> str:
    return "-" if not math.isfinite(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def apply_holm(rows: Sequence[Judgement], alpha: float = ALPHA) -> list[Judgement]:
    """Holm's correction over ``rows`` (one family: the rows of one claim for one dataset/arch).
    Rows with a p-value get ``p_holm`` and the family size; a ``supported``/``contradicted``
    verdict whose adjusted p exceeds ``alpha`` becomes ``inconclusive``. Idempotent."""
    adjusted = holm([j.p for j in rows])
    m = int(np.isfinite(adjusted).sum())
    out = []
    for j, adj in zip(rows, adjusted, strict=True):
        verdict_, reason = j.pre_verdict or j.verdict, j.pre_reason or j.reason
        if math.isfinite(adj):
            if verdict_ in (SUPPORTED, CONTRADICTED) and adj > alpha:
                reason = (f"{reason}, but the Holm-adjusted p = {_fmt_p(adj)} > {alpha:.2g} "
                          f"({m} tests in claim {j.claim})")
                verdict_ = INCONCLUSIVE
            j = replace(j, p_holm=float(adj), holm_m=m)
        out.append(replace(j, verdict=verdict_, reason=reason, pre_verdict=j.pre_verdict or j.verdict,
                           pre_reason=j.pre_reason or j.reason))
    return out


def judge_difference(claim: str, a: Side, b: Side, expect: Expect, *, margin: float = DEFAULT_MARGIN,
                     unit: str = "pp", comparison: str | None = None, paired: bool = True,
                     shares_init: bool | None = None, feasible: tuple[float, float] = (-1.0, 1.0),
                     confidence: float = CONFIDENCE) -> Judgement:
    """Claim "A - B lies ``expect`` 0" judged from two sides (the module rule, steps 1-5; Holm
    over a family of this one row). ``paired``: the design pairs runs of the same seed (main
    grid); they are paired when both sides ran the same seeds. ``shares_init``: default from
    :data:`SHARES_INIT`. ``margin`` and ``feasible`` are in accuracy units."""
    comparison = comparison or f"{a.name} - {b.name}"
    if shares_init is None:
        shares_init = (a.name, b.name) in SHARES_INIT
    fisher_p = fisher_failures(a, b)
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect=expect, unit=unit, a=a, b=b,
                     margin=margin, fisher_p=fisher_p)
    failures = ""
    if math.isfinite(fisher_p):
        failures = (f"; failures {a.name} {a.failures_text()} vs {b.name} {b.failures_text()} "
                    f"(Fisher p = {_fmt_p(fisher_p)})")
    # 1. a variant without runs
    missing = [g.name for g in (a, b) if not g.runs]
    if missing:
        return apply_holm([replace(base, verdict=inconclusive_n(0),
                                   reason=f"{', '.join(missing)} not in the runs")])[0]
    # pairing (known before any test, so that every row says it)
    seeds_a, seeds_b = a.seeds, b.seeds
    can_pair = (paired and None not in seeds_a and None not in seeds_b
                and len(set(seeds_a)) == len(seeds_a) and len(set(seeds_b)) == len(seeds_b)
                and set(seeds_a) == set(seeds_b))
    if can_pair:
        ta, tb = a.trained_by_seed(), b.trained_by_seed()
        common = sorted(set(ta) & set(tb))
        n, xs, ys = len(common), [ta[s] for s in common], [tb[s] for s in common]
        base = replace(base, pairing="paired", shares_init=bool(shares_init), n_test=n)
        too_few = f"{n} seeds where both trained, {MIN_SEEDS} needed"
    else:
        n, xs, ys = min(a.n_trained, b.n_trained), list(a.values), list(b.values)
        why_unpaired = "not a paired design" if not paired else "the sides' seeds differ"
        base = replace(base, pairing="unpaired", shares_init=False, n_test=n, detail=f"unpaired: {why_unpaired}")
        too_few = (f"unpaired ({why_unpaired}): {a.name} {a.n_trained}, {b.name} {b.n_trained} "
                   f"trained runs, {MIN_SEEDS} a side needed")
    # 2. a side that cannot fit its own training data
    unfit = [g for g in (a, b) if g.failed_to_train]
    if unfit:
        why = "; ".join(f"{g.name}: {sum(not r.fits for r in g.runs)} of {g.n_runs} runs under "
                        f"{f'{g.threshold:.0%}' if math.isfinite(g.threshold) else 'the threshold'} "
                        f"final clean train accuracy ({g.n_diverged} diverged)" for g in unfit)
        return apply_holm([replace(base, verdict=BASELINE_FAILED, reason=why + failures)])[0]
    # 3. the number of seeds (pairs)
    if n < MIN_SEEDS:
        return apply_holm([replace(base, verdict=inconclusive_n(n), reason=too_few + failures)])[0]
    # 4. the interval and the rule (from 6 pairs the sign-flip interval must agree)
    if can_pair:
        t = paired_t(xs, ys, margin=margin, confidence=confidence)
        alt = signflip(np.subtract(xs, ys), margin=margin, confidence=confidence) if n >= SIGNFLIP_MIN_N else None
    else:
        t, alt = welch_t(xs, ys, margin=margin, confidence=confidence), None
    t, clipped = clip(t, *feasible)
    sc = 100.0 if unit == "pp" else 1.0
    method = t.method + (f", clipped to [{feasible[0] * sc:+g}, {feasible[1] * sc:+g}]" if clipped else "")
    base = replace(base, effect=t.effect, low=t.low, high=t.high, method=method, clipped=clipped,
                   t_low=t.low, t_high=t.high)
    result, why = _geometry(t.low, t.high, expect, margin)
    u = " pp" if unit == "pp" else ""
    if why == "equivalent":
        p, p_test = t.p_tost, f"TOST (+-{margin * sc:g}{u}), {t.method}"
        reason = f"equivalent: CI inside +-{margin * sc:g}{u}"
        favoured = b if expect == "above" else a
    else:
        p, p_test = t.p, f"two-sided {t.method}"
        if result == INCONCLUSIVE:
            reason, favoured = f"CI {why}", None
        else:
            hi = a if t.low > 0 else b
            lo = b if hi is a else a
            reason = f"CI {'above' if t.low > 0 else 'below'} 0: {hi.name} higher than {lo.name}"
            favoured = hi
    if alt is not None:
        alt, _ = clip(alt, *feasible)
        base = replace(base, alt_low=alt.low, alt_high=alt.high,
                       method=f"{method}; {alt.method} [{alt.low * sc:+.3g}, {alt.high * sc:+.3g}]")
        if result != INCONCLUSIVE and _geometry(alt.low, alt.high, expect, margin) != (result, why):
            reason = (f"{reason}, but the {alt.method} interval [{alt.low * sc:+.3g}, {alt.high * sc:+.3g}]"
                      f"{u} disagrees")
            result, favoured = INCONCLUSIVE, None
    # 5. survivors never carry a verdict
    if favoured is not None:
        other = b if favoured is a else a
        if favoured.failure_rate > other.failure_rate:
            reason = (f"{reason}, but {favoured.name} failed more often ({favoured.failures_text()} vs "
                      f"{other.failures_text()}): its mean is of its survivors")
            result = INCONCLUSIVE
    return apply_holm([replace(base, verdict=result, reason=reason + failures, p=p, p_test=p_test)])[0]


def by_construction(claim: str, comparison: str, fact: str, *, detail: str = "",
                    effect: float = math.nan, low: float = math.nan, high: float = math.nan,
                    unit: str = "", method: str = "", a: Side | None = None,
                    b: Side | None = None) -> Judgement:
    """A property the code guarantees, stated as a fact (no test, not in Holm's family)."""
    return Judgement(claim, comparison, BY_CONSTRUCTION, fact, expect="", effect=effect, low=low,
                     high=high, unit=unit, method=method, a=a, b=b, detail=detail)


# --------------------------------------------------------------------------------------------
# The learning-rate sweep (claims 1 and 2)


Sweep = Mapping[float, Side]  # sweep point (lr factor or absolute lr) -> the variant's runs there


def point_stable(side: Side, min_seeds: int = MIN_SWEEP_SEEDS) -> bool | None:
    """True when every run at the point trained, False when one failed, None with fewer than
    ``min_seeds`` runs (not judged)."""
    if side.n_runs < min_seeds:
        return None
    return side.n_failed == 0


def _pts(values: Iterable[float]) -> str:
    values = list(values)
    return ", ".join(f"{v:g}" for v in values) if values else "none"


def _judged(sweeps: Mapping[str, Sweep], min_seeds: int) -> tuple[list[float], dict, str]:
    """The points every variant has a judged point at, stability there, and why any is missing."""
    missing = [name for name, s in sweeps.items() if not s]
    if missing:
        return [], {}, f"no learning-rate sweep of {', '.join(missing)}"
    status = {name: {x: point_stable(g, min_seeds) for x, g in s.items()} for name, s in sweeps.items()}
    common = sorted(set.intersection(*({x for x, ok in st.items() if ok is not None} for st in status.values())))
    if not common:
        return [], status, (f"no sweep point with >= {min_seeds} runs of every one of {', '.join(sweeps)}")
    return common, status, ""


def _pooled(sweep: Sweep, points: Sequence[float], name: str) -> Side:
    return Side(name, tuple(r for x in points for r in sweep[x].runs))


def _steps_text(side: Side) -> str:
    steps = side.diverged_steps()
    if not steps:
        return ""
    lo, hi = min(steps), max(steps)
    rng = f", range {lo:g}-{hi:g}" if lo != hi else ""
    return f"diverged at step median {float(np.median(steps)):g}{rng}"


def judge_instability(plain: Sweep, bn: Sweep, chance: float | None = None, claim: str = "1", *,
                      min_seeds: int = MIN_SWEEP_SEEDS, key: str = "lr") -> Judgement:
    """Claim 1 (module rule): ``plain`` trains at some lr and fails at a higher one where ``bn``
    is stable. ``chance`` is unused (the sides carry their outcomes); ``key``: what the sweep
    points are ("lr factor" or "lr"), for the text."""
    comparison = "lr sweep: plain fails where bn trains"
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="plain trains at a low lr, fails where bn is stable",
                     unit="pp")
    common, status, why = _judged({"plain": plain, "bn": bn}, min_seeds)
    if why:
        return replace(base, reason=why)
    a, b = _pooled(plain, common, "plain"), _pooled(bn, common, "bn")
    rate = rate_difference(a.n_failed, a.n_runs, b.n_failed, b.n_runs)
    base = replace(base, a=a, b=b, effect=rate.effect, low=rate.low, high=rate.high,
                   method=f"Newcombe score (failure rate, {key} {_pts(common)})",
                   fisher_p=fisher_failures(a, b))
    plain_ok = [x for x in sorted(plain) if status["plain"][x]]
    plain_judged = [x for x in sorted(plain) if status["plain"][x] is not None]
    bn_ok = [x for x in common if status["bn"][x]]
    plain_fails = [x for x in bn_ok if not status["plain"][x]]
    detail = (f"bn stable at {key} {_pts(bn_ok)}; plain stable at {_pts(plain_ok)}; plain fails where bn "
              f"is stable at {_pts(plain_fails)}")
    base = replace(base, detail=detail)
    if not plain_ok:
        everything = _pooled(plain, plain_judged, "plain")
        steps = _steps_text(everything)
        how = (f"{everything.n_diverged} of {everything.n_runs} runs diverged"
               + (f" ({steps})" if steps else "")
               + (f", {everything.n_at_chance} ended at chance" if everything.n_at_chance else ""))
        return replace(base, reason=f"plain fails at every {key} tried ({_pts(plain_judged)}): "
                                    f"initialization, not lr; {how}")
    if not bn_ok:
        return replace(base, reason=f"bn is stable at no {key} of the sweep ({_pts(common)})")
    higher = [x for x in plain_fails if x > min(plain_ok)]
    if higher:
        return replace(base, verdict=SUPPORTED,
                       reason=f"plain trains at {key} {_pts(plain_ok)} and fails at {_pts(higher)}, "
                              f"where bn is stable")
    if plain_fails:
        return replace(base, reason=f"plain fails where bn is stable only below the {key} it trains at "
                                    f"({_pts(plain_fails)} < {min(plain_ok):g})")
    return replace(base, verdict=CONTRADICTED,
                   reason=f"plain is stable at every {key} where bn is ({_pts(bn_ok)})")


@dataclass(frozen=True)
class Stability:
    """A variant's stable points over a sweep grid."""

    stable: tuple[float, ...]
    highest: float | None
    range_low: float | None
    range_high: float | None

    @property
    def octaves(self) -> float | None:
        if self.range_low is None or self.range_high is None:
            return None
        return math.log2(self.range_high / self.range_low)

    def text(self) -> str:
        if self.highest is None:
            return "none stable"
        return (f"highest {self.highest:g}, range {self.range_low:g}-{self.range_high:g} "
                f"({self.octaves:.2g} oct.)")


def stability_profile(status: Mapping[float, bool | None], grid: Sequence[float]) -> Stability:
    """Highest stable point of ``grid`` and the widest contiguous run of stable points (in
    octaves; a tie goes to the higher run)."""
    grid = sorted(grid)
    stable = tuple(x for x in grid if status.get(x))
    best: tuple[float, float] | None = None
    run: list[float] = []
    for x in [*grid, None]:
        if x is not None and status.get(x):
            run.append(x)
            continue
        if run:
            width = math.log2(run[-1] / run[0]) if run[0] > 0 else math.inf
            if best is None or width >= math.log2(best[1] / best[0]):
                best = (run[0], run[-1])
        run = []
    return Stability(stable, max(stable) if stable else None, *(best or (None, None)))


def judge_stability(msr: Sweep, bn: Sweep, plain: Sweep, chance: float | None = None, claim: str = "2", *,
                    min_seeds: int = MIN_SWEEP_SEEDS, key: str = "lr") -> Judgement:
    """Claim 2 (module rule): ``msr``'s highest stable point and widest stable range (octaves)
    are >= ``bn``'s and > ``plain``'s. ``chance`` is unused (kept for old callers)."""
    comparison = f"lr sweep: highest stable {key} and stable range, msr vs bn and plain"
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="msr >= bn, msr > plain", unit="lr")
    sweeps = {"msr": msr, "bn": bn, "plain": plain}
    common, status, why = _judged(sweeps, min_seeds)
    if why:
        return replace(base, reason=why)
    prof = {n: stability_profile(status[n], common) for n in sweeps}
    groups = {n: _pooled(s, common, n) for n, s in sweeps.items()}
    detail = "; ".join(f"{n} {p.text()}" for n, p in prof.items()) + f" (of {key} {_pts(common)})"
    base = replace(base, detail=detail, a=groups["msr"], b=groups["bn"],
                   method=f"stable: every run trained, >= {min_seeds} runs; by {key}",
                   seeds=" / ".join(f"{n} {g.counts_text()}" for n, g in groups.items()))
    if all(p.highest is None for p in prof.values()):
        return replace(base, reason=f"no variant is stable at any {key} ({_pts(common)})")

    def val(x):
        return -math.inf if x is None else x

    top = {n: val(p.highest) for n, p in prof.items()}
    octs = {n: val(p.octaves) for n, p in prof.items()}
    reversed_ = [f"{what} below {n}'s" for what, m in (("highest stable", top), ("stable range", octs))
                 for n in ("bn", "plain") if m["msr"] < m[n]]
    if reversed_:
        return replace(base, verdict=CONTRADICTED, reason="msr's " + " and ".join(reversed_))
    ties = [f"{what} ties with plain's" for what, m in (("highest stable", top), ("stable range", octs))
            if m["msr"] == m["plain"]]
    if ties:
        edge = " (the top of the sweep: censored)" if prof["msr"].highest == max(common) else ""
        return replace(base, reason="msr's " + " and ".join(ties) + edge)
    return replace(base, verdict=SUPPORTED,
                   reason="msr's highest stable point and stable range are >= bn's and > plain's")


# --------------------------------------------------------------------------------------------
# Claim 3: the test graph is the training graph


def _identical(diff: float, scale: float) -> bool:
    return diff <= IDENTITY_TOL * max(scale, 1e-12)


def judge_identity(max_abs_diff: float, scale: float, *, claim: str = "3", variant: str = "msr_noise",
                   control: float | None = None, control_scale: float | None = None,
                   note: str = "") -> Judgement:
    """Measured: max |eval output - train-mode output without noise| of ``variant`` on one
    input. ``supported`` within IDENTITY_TOL x the largest output (``scale``), ``contradicted``
    above; ``inconclusive`` when not finite, or when the ``control`` (bn: max |train - eval|)
    is missing or shows no difference (the test could not see one)."""
    comparison = f"{variant}: eval graph == train graph without noise (same weights, same input)"
    detail = f"max |difference| {max_abs_diff:.3g}" + \
        (f" (bn control: {control:.3g})" if control is not None else "")
    note = f"; {note}" if note else ""
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="0", effect=max_abs_diff,
                     low=max_abs_diff, high=max_abs_diff, unit="abs", method="test", detail=detail)
    if not (math.isfinite(max_abs_diff) and math.isfinite(scale)):
        return replace(base, reason="the outputs are not finite" + note)
    if not _identical(max_abs_diff, scale):
        return replace(base, verdict=CONTRADICTED,
                       reason=f"the outputs differ by more than {IDENTITY_TOL:g} x the largest |output| "
                              f"({scale:.3g}){note}")
    if control is None or not math.isfinite(control):
        return replace(base, reason="identical, but no bn control was measured: the test is unchecked" + note)
    if _identical(control, scale if control_scale is None else control_scale):
        return replace(base, reason="identical, but so are bn's train and eval outputs: the test sees "
                                    "no difference where there is one" + note)
    return replace(base, verdict=SUPPORTED,
                   reason=f"identical (largest |output| {scale:.3g}; the bn control differs){note}")


def judge_msr_mode_free(measured: Mapping | None = None, claim: str = "3") -> Judgement:
    """``msr`` has no layer that depends on train/eval mode (no batch statistics, no noise,
    no dropout): ``by construction``; a measurement (``{"diff", "scale", "note"}``) is shown,
    and one above tolerance contradicts the construction (a bug)."""
    comparison = "msr: no layer depends on train/eval mode"
    fact = "msr has no batch statistics, noise or dropout (its train and eval graphs are one)"
    if not measured:
        return by_construction(claim, comparison, fact, unit="abs", detail="not measured")
    diff, scale = float(measured["diff"]), float(measured["scale"])
    note = f"; {measured['note']}" if measured.get("note") else ""
    detail = f"measured max |train - eval| {diff:.3g}"
    if math.isfinite(diff) and math.isfinite(scale) and not _identical(diff, scale):
        return Judgement(claim, comparison, CONTRADICTED,
                         f"the construction says identical, but the outputs differ by {diff:.3g} (largest "
                         f"|output| {scale:.3g}): a bug{note}", expect="0", effect=diff, low=diff, high=diff,
                         unit="abs", method="test", detail=detail)
    return by_construction(claim, comparison, fact + note, detail=detail, effect=diff, low=diff, high=diff,
                           unit="abs", method="test")


def train_eval_difference(variant: str, depth: int, num_classes: int, in_channels: int,
                          image_size: int, state_dict: Mapping | None = None,
                          overrides: Mapping | None = None, seed: int = 0,
                          train_overrides: Mapping | None = None) -> tuple[float, float]:
    """(max |train-mode output - eval-mode output|, max |eval output|) of ``variant`` (trained
    weights from ``state_dict`` if given, else its initialization) on one fixed random batch
    of 8. ``train_overrides``: the train-mode output comes from the same weights in a model
    built with these extra overrides, e.g. ``{"noise_delta": 0}`` for claim 3's "eval graph ==
    train graph without noise" of ``msr_noise``."""
    import torch

    from msr.core import variants

    torch.manual_seed(seed)
    model = variants.build(variant, depth=depth, num_classes=num_classes, in_channels=in_channels,
                           **dict(overrides or {})).model
    if state_dict is not None:
        model.load_state_dict(state_dict)
    trainer = model
    if train_overrides:
        trainer = variants.build(variant, depth=depth, num_classes=num_classes, in_channels=in_channels,
                                 **{**dict(overrides or {}), **dict(train_overrides)}).model
        trainer.load_state_dict(model.state_dict())
    x = torch.randn(8, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        trainer.train()
        train_out = trainer(x)
        model.eval()
        eval_out = model(x)
    return float((train_out - eval_out).abs().max()), float(eval_out.abs().max())


# --------------------------------------------------------------------------------------------
# Table T3 from the aggregated runs


def sweep_key(runs: pd.DataFrame) -> tuple[str, str]:
    """(column, words) the lr sweep is keyed by: ``lr_factor`` when runs.csv has it for every
    sweep run (a main-grid run without one is factor 1.0), else the absolute ``lr``."""
    if "lr_factor" in runs.columns:
        sel = runs[runs["sweep"].isin(["base", "lr"])]
        factor = pd.to_numeric(sel["lr_factor"], errors="coerce")
        factor = factor.where(factor.notna() | (sel["sweep"] != "base"), 1.0)
        if factor.notna().all():
            return "lr_factor", "lr factor"
    return "lr", "lr"


def lr_sweep(runs: pd.DataFrame, variant: str, chance: float, key: str = "lr") -> dict[float, Side]:
    """Sweep point -> :class:`Side` of ``variant`` in ``runs`` (one dataset/arch): the lr
    sweep's runs plus the main grid's, only if the variant has an lr sweep at all."""
    mine = runs[runs["variant"] == variant]
    if mine.empty or not (mine["sweep"] == "lr").any():
        return {}
    mine = mine[mine["sweep"].isin(["base", "lr"])]
    x = pd.to_numeric(mine[key], errors="coerce")
    if key == "lr_factor":
        x = x.where(x.notna() | (mine["sweep"] != "base"), 1.0)
    return {float(v): side_of(g, variant, chance) for v, g in mine.groupby(x.astype(float).round(10))}


def base_side(runs: pd.DataFrame, variant: str, chance: float) -> Side:
    return side_of(runs[(runs["sweep"] == "base") & (runs["variant"] == variant)], variant, chance)


def init_mean_shift(probes: pd.DataFrame, runs: pd.DataFrame, variant: str) -> dict[int, float]:
    """Seed -> the mean shift of the deepest conv layer at step 0 (initialization) of
    ``variant``'s main-grid runs (every seed counts: a run that diverged later had an init)."""
    sel = runs[(runs["sweep"] == "base") & (runs["variant"] == variant)]
    seed_of = dict(zip(sel["run_id"], sel["seed"], strict=True))
    p = probes[probes["run_id"].isin(seed_of) & (probes["metric"] == "mean_shift") & (probes["step"] == 0)]
    out = {}
    for rid, g in p.groupby("run_id", sort=True):
        value = float(g["value"].iloc[-1])  # probes are recorded in forward order: last = deepest
        if math.isfinite(value):
            out[int(seed_of[rid])] = value
    return out


def judge_mean_shift(probes: pd.DataFrame | None, runs: pd.DataFrame, claim: str = "1") -> Judgement:
    """Claim 1's cause, ``plain`` - ``msr`` mean shift at init: ``by construction`` (zero-mean
    init), the measured effect shown (paired t by seed when both have the same seeds); a CI
    wholly below 0 contradicts the construction (a bug)."""
    comparison = "mean shift at init, deepest conv: plain - msr (zero-mean init)"
    fact = "zero-mean init gives every msr kernel zero mean, so msr starts without mean shift"
    if probes is None:
        return by_construction(claim, comparison, fact, unit="ratio", detail="not measured (no probes)")
    a, b = init_mean_shift(probes, runs, "plain"), init_mean_shift(probes, runs, "msr")
    side = lambda name, v: Side.of(name, list(v.values()), seeds=list(v))  # noqa: E731
    sa, sb = side("plain", a), side("msr", b)
    j = by_construction(claim, comparison, fact, unit="ratio", a=sa, b=sb)
    if len(a) < 2 or len(b) < 2:
        return replace(j, detail=f"measured on {len(a)} / {len(b)} seeds: too few for an interval")
    if set(a) == set(b):
        ci = paired_t([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])
        j = replace(j, pairing="paired", shares_init=False, n_test=len(a))
    else:
        ci = welch_t(list(a.values()), list(b.values()))
        j = replace(j, pairing="unpaired", shares_init=False, n_test=min(len(a), len(b)))
    j = replace(j, effect=ci.effect, low=ci.low, high=ci.high, method=ci.method,
                detail=f"measured: plain {np.mean(list(a.values())):.3g}, msr {np.mean(list(b.values())):.3g}")
    if ci.high < 0:  # msr measurably MORE shifted than plain: the construction is broken
        return replace(j, verdict=CONTRADICTED, expect="above",
                       reason="the construction says msr starts without mean shift, but its measured "
                              "mean shift at init exceeds plain's: a bug")
    return j


def _identity_of(entry: Mapping | None) -> dict[str, Mapping]:
    """Normalise claims_table's ``identity`` entry: {"msr": {...}, "msr_noise": {...}, "bn":
    {...}}; the old flat form {"diff", "scale", "control", "note"} is msr's measurement with
    bn's difference as control."""
    if not entry:
        return {}
    if "diff" in entry:
        out = {"msr": {k: entry[k] for k in ("diff", "scale", "note") if k in entry}}
        if entry.get("control") is not None:
            out["bn"] = {"diff": entry["control"]}
        return out
    return {k: v for k, v in entry.items() if v is not None}


def judge_pair(runs: pd.DataFrame, chance: float, *, margin: float = DEFAULT_MARGIN,
               probes: pd.DataFrame | None = None, identity: Mapping | None = None,
               min_sweep_seeds: int = MIN_SWEEP_SEEDS) -> list[Judgement]:
    """Every row of T3 for one dataset/arch (``runs`` already selected to it), Holm's
    correction applied per claim."""
    rows: list[Judgement] = []
    have = set(runs["variant"])
    key, key_words = sweep_key(runs)

    def diff(claim_id, a, b, expect):
        sa = base_side(runs, a, chance) if a in have else Side(a)
        sb = base_side(runs, b, chance) if b in have else Side(b)
        return judge_difference(claim_id, sa, sb, expect, margin=margin)

    def sweep(variant):
        return lr_sweep(runs, variant, chance, key)

    # claim 1: instability without normalization, and its cause at init
    rows.append(judge_instability(sweep("plain"), sweep("bn"), min_seeds=min_sweep_seeds, key=key_words))
    rows.append(judge_mean_shift(probes, runs))
    # claim 2: msr trains where plain cannot; ZMI/ZMG help on top of the affine scheme
    rows.append(judge_stability(sweep("msr"), sweep("bn"), sweep("plain"), min_seeds=min_sweep_seeds,
                                key=key_words))
    rows.append(diff("2", "msr", "nf", "above"))
    # claim 3: the test graph is the training graph
    ident = _identity_of(identity)
    rows.append(judge_msr_mode_free(ident.get("msr")))
    noise = ident.get("msr_noise")
    if noise is None:
        rows.append(Judgement("3", "msr_noise: eval graph == train graph without noise", INCONCLUSIVE,
                              "not measured", expect="0", unit="abs"))
    else:
        control = ident.get("bn", {})
        rows.append(judge_identity(float(noise["diff"]), float(noise["scale"]), note=str(noise.get("note", "")),
                                   control=None if control.get("diff") is None else float(control["diff"]),
                                   control_scale=None if control.get("scale") is None else float(control["scale"])))
    # claims 4-6: accuracy differences on the main grid
    rows.append(diff("4", "msr_noise", "msr", "above"))
    rows.append(diff("4", "bn_noise", "bn", "above"))
    rows.append(diff("5", "msr_noise", "bn", "above"))
    rows += [diff("6", peer, "bn", "below") for peer in PEERS_CLAIM6]
    # Holm per claim
    out: list[Judgement] = []
    for claim_id in dict.fromkeys(j.claim for j in rows):
        out += apply_holm([j for j in rows if j.claim == claim_id])
    return out


COLUMNS = list(Judgement("", "", "", "", context={"dataset": "", "arch": ""}).row())


def claims_table(runs: pd.DataFrame, *, probes: pd.DataFrame | None = None,
                 identity: Mapping[tuple[str, str], Mapping] | None = None,
                 num_classes: Mapping[str, int] | None = None,
                 margins: Mapping[str, float] | None = None, default_margin: float = DEFAULT_MARGIN,
                 min_sweep_seeds: int = MIN_SWEEP_SEEDS) -> pd.DataFrame:
    """T3: one row per comparison per dataset/arch of ``runs`` (runs.csv; columns used:
    dataset, arch, variant, sweep, seed, status, final_test_acc, final_clean_train_acc,
    diverged_at_step, lr, optional lr_factor, run_id for probes).

    - ``probes``: step-0 mean-shift probes of the main-grid runs (long format, as
      msr.analysis.aggregate.load_probes), for claim 1's mean-shift row (``by construction``);
    - ``identity``: (dataset, arch) -> {"msr": {"diff", "scale", "note"}, "msr_noise": {"diff",
      "scale", "note"}, "bn": {"diff", "scale"}} from :func:`train_eval_difference` (msr: train
      vs eval; msr_noise: eval vs train with ``train_overrides={"noise_delta": 0}``; bn: train vs
      eval, the control). The old flat {"diff", "scale", "control", "note"} is msr's with bn's
      control;
    - ``num_classes``: dataset -> classes for a dataset NUM_CLASSES lacks;
    - ``margins``: dataset -> equivalence margin in accuracy units (``default_margin``, 0.005 =
      0.5 pp, for the others); printed in the ``margin`` column (pp);
    - ``min_sweep_seeds``: runs a sweep point needs to be judged (claims 1-2).

    Columns: see :data:`COLUMNS`; effects, intervals and margins in pp for unit ``pp``; counts
    are integers (nullable)."""
    rows = []
    pairs = runs[["dataset", "arch"]].drop_duplicates() if not runs.empty else pd.DataFrame(columns=["dataset", "arch"])
    pairs = sorted(zip(pairs["dataset"], pairs["arch"], strict=True),
                   key=lambda p: (p[0], depth_of_arch(p[1]) or 0, p[1]))
    for dataset, arch in pairs:
        here = runs[(runs["dataset"] == dataset) & (runs["arch"] == arch)]
        margin = float((margins or {}).get(dataset, default_margin))
        for j in judge_pair(here, chance_level(dataset, num_classes), margin=margin, probes=probes,
                            identity=(identity or {}).get((dataset, arch)), min_sweep_seeds=min_sweep_seeds):
            rows.append(replace(j, context={"dataset": dataset, "arch": arch}).row())
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({**{c: "Int64" for c in COUNT_COLUMNS},
                         **{c: "boolean" for c in ("shares_init", "ci_clipped")}})


def overrides_of(row: Mapping) -> dict:
    """A run's variant overrides from runs.csv (stored there as JSON)."""
    text = row.get("overrides")
    return json.loads(text) if isinstance(text, str) and text else {}
