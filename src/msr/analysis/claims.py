"""The paper's claims judged from the runs: statistics, the verdict rule, and table T3.

docs/method.md, "Claims, verdicts and the rule": every claim gets a verdict per dataset and arch -
``supported``, ``contradicted`` or ``inconclusive`` - by one rule, stated here and printed
under the table (:data:`RULES`):

- **Accuracy claims** (2 vs ``nf``, 4, 5, 6; and claim 1's mean shift at init): the effect is the
  difference of the two groups' means over seeds, A - B, with a 95% confidence interval from
  **Welch's t** (unequal variances, Welch-Satterthwaite degrees of freedom). :func:`verdict`:
  ``supported`` when the whole CI lies on the side of 0 the claim predicts, ``contradicted``
  when it lies wholly on the other side, ``inconclusive`` when it touches or spans 0.
- **Diverged seeds** are not accuracies: a diverged run's last evaluation is of a model about
  to become non-finite (msr.analysis.aggregate keeps them out of every mean, and so do we). They enter
  the comparison in two ways instead: (1) a side with fewer than :data:`MIN_SEEDS` completed
  seeds is ``inconclusive`` (docs/method.md), and (2) divergence can never make a side win: if the
  CI favours a side that lost seeds to divergence, the verdict is ``inconclusive`` (its mean
  is of its survivors only). If the side with diverged seeds loses anyway, the verdict stands
  and the reason names the count.
- **Stability claims** (1 and 2) are judged over the learning-rate sweep (the runs tagged
  ``lr<value>`` plus the main grid's runs, at the learning rates every compared variant ran). A
  sweep point is *stable* when it has at least :data:`MIN_SEEDS` seeds, every one completed,
  and every one ends at a test accuracy of at least ``chance + STABLE_FRACTION * (1 - chance)``
  ("well above chance"; 55% for 10 classes). A point with fewer seeds is not judged.
  Claim 1 is supported when ``plain`` is not stable at some lr where ``bn`` is, contradicted
  when ``plain`` is stable at every lr where ``bn`` is. Claim 2 is supported when ``msr``'s
  highest stable lr is at least ``bn``'s and above ``plain``'s, contradicted when it is below
  either (the ordering reversed); a tie with ``plain`` is inconclusive.
- **Claim 3** is a test, not a statistic: the largest |train-mode - eval-mode| output of the
  same ``msr`` model on the same input; supported when it is within :data:`IDENTITY_TOL` of 0
  (relative to the largest output), contradicted otherwise.

Every verdict comes with a reason: why it is inconclusive (too few completed seeds, every seed
diverged, CI spans 0, the sweep or a variant missing) or what supports/contradicts it.

Imports no torch at module level (the notebook and the tests of the rule start fast);
:func:`train_eval_difference` imports it when called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from msr.analysis.aggregate import depth_of_arch, t_quantile

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
CONFIDENCE = 0.95
MIN_SEEDS = 2  # docs/method.md: a group with fewer completed seeds is inconclusive
# "Well above chance": a stable run ends at >= chance + STABLE_FRACTION * (1 - chance), i.e.
# half way from chance to perfect (55% for 10 classes, 50.5% for 100). Low enough that a short
# run that trains passes, high enough that a run stuck near chance never does.
STABLE_FRACTION = 0.5
# Claim 3: train-mode and eval-mode outputs count as identical within this fraction of the
# largest |output| (float32 rounding, should the two modes ever take different kernels); the
# measured difference of msr on CPU is exactly 0.
IDENTITY_TOL = 1e-6
# Classes per dataset, for the chance level (1 / classes). A dataset not listed needs its
# number passed in (``num_classes=``); the error says so rather than guessing.
NUM_CLASSES = {"digits": 10, "synthetic": 10, "cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
PEERS_CLAIM6 = ("wn", "fixup", "skipinit")

Expect = Literal["above", "below"]

RULES = (
    f"Verdict rule (msr.analysis.claims): effects are differences of final-epoch test accuracy means "
    f"over completed seeds, A - B, with a {CONFIDENCE:.0%} Welch t confidence interval; "
    f"supported when the CI lies wholly on the side the claim predicts, contradicted when wholly "
    f"on the other side, inconclusive when it touches or spans 0.",
    f"A side with fewer than {MIN_SEEDS} completed seeds is inconclusive; diverged seeds are "
    f"not in any mean and can never make their side win (the verdict is then inconclusive).",
    f"Claims 1-2 use the learning-rate sweep: an lr is stable for a variant when all of its "
    f"(>= {MIN_SEEDS}) seeds completed at >= chance + {STABLE_FRACTION:g} x (1 - chance) "
    f"final test accuracy. Claim 3 is a test of the built model: max |train - eval output|.",
)


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Group:
    """One side of a comparison: a variant's seeds at one grid point.

    ``values``: the metric of the completed seeds (final test accuracy in [0, 1], or any
    other per-seed number); ``n_diverged``: seeds whose loss became non-finite (not in
    ``values``).
    """

    name: str
    values: tuple[float, ...] = ()
    n_diverged: int = 0

    @property
    def n_completed(self) -> int:
        return len(self.values)

    @property
    def n_runs(self) -> int:
        return self.n_completed + self.n_diverged

    def describe(self) -> str:
        """Why this group cannot be compared, or '' if it can."""
        if self.n_runs == 0:
            return f"{self.name}: no runs"
        if self.n_completed == 0:
            return f"{self.name}: all {self.n_runs} seeds diverged"
        if self.n_completed < MIN_SEEDS:
            extra = f" ({self.n_diverged} diverged)" if self.n_diverged else ""
            return f"{self.name}: only {self.n_completed} completed seed{extra}, {MIN_SEEDS} needed"
        return ""


def group_of(runs: pd.DataFrame, name: str, metric: str = "final_test_acc") -> Group:
    """The :class:`Group` of ``runs`` (already selected to one grid point): completed runs give
    values, diverged runs count; other statuses (e.g. interrupted) are not results."""
    status = runs["status"].astype(str) if not runs.empty else pd.Series(dtype=str)
    done = pd.to_numeric(runs.loc[status == "completed", metric], errors="coerce") \
        if not runs.empty else pd.Series(dtype=float)
    values = tuple(float(v) for v in done if math.isfinite(v))
    return Group(name, values, int((status == "diverged").sum()))


@dataclass(frozen=True)
class Interval:
    """An effect A - B with its confidence interval."""

    effect: float
    low: float
    high: float
    method: str


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean(a) - mean(b) with Welch's t interval (unequal variances; Welch-Satterthwaite degrees
    of freedom). Needs two values per side. Two zero-variance sides give a zero-width
    interval at the difference (e.g. two identical deterministic groups: [0, 0])."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        raise ValueError(f"Welch's interval needs >= 2 values per side, got {x.size} and {y.size}")
    effect = float(x.mean() - y.mean())
    # equal values have variance exactly 0 (numpy's mean can round, leaving ~1e-33)
    va, vb = ((0.0 if np.ptp(v) == 0 else v.var(ddof=1) / v.size) for v in (x, y))
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Interval(effect, effect, effect, "Welch t")
    dof = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    half = t_quantile(confidence, dof) * se
    return Interval(effect, effect - half, effect + half, "Welch t")


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
    which, unlike the normal approximation, stays sensible at rates of 0 and 1."""
    if n_a == 0 or n_b == 0:
        raise ValueError(f"a rate needs at least one run per side, got n={n_a} and n={n_b}")
    pa, pb = k_a / n_a, k_b / n_b
    la, ua = wilson_interval(k_a, n_a, confidence)
    lb, ub = wilson_interval(k_b, n_b, confidence)
    d = pa - pb
    low = d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)
    high = d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
    return Interval(d, low, high, "Newcombe score")


# --------------------------------------------------------------------------------------------
# The verdict rule


def verdict(low: float, high: float, expect: Expect) -> str:
    """THE rule for an effect's confidence interval [low, high]: ``supported`` when it lies
    strictly on the side of 0 the claim predicts (``expect``: "above" or "below"),
    ``contradicted`` when strictly on the other side, else (touching or spanning 0, or not a
    number) ``inconclusive``."""
    if expect not in ("above", "below"):
        raise ValueError(f"expect must be 'above' or 'below', got {expect!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    above, below = low > 0, high < 0
    if (above and expect == "above") or (below and expect == "below"):
        return SUPPORTED
    if above or below:
        return CONTRADICTED
    return INCONCLUSIVE


@dataclass(frozen=True)
class Judgement:
    """One row of T3."""

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
    a: Group | None = None
    b: Group | None = None
    detail: str = ""  # the effect in words where it is not a number (stable learning rates)
    seeds: str = ""  # n per side in words; default "<n A> (<k> div.) / <n B>"
    context: dict = field(default_factory=dict)  # dataset, arch

    def seeds_text(self) -> str:
        if self.seeds or self.a is None or self.b is None:
            return self.seeds
        return f"{_seeds(self.a)} / {_seeds(self.b)}"

    def row(self) -> dict:
        scale = 100.0 if self.unit == "pp" else 1.0
        side = lambda g, attr: getattr(g, attr) if g is not None else None  # noqa: E731
        return {
            **self.context, "claim": self.claim, "comparison": self.comparison,
            "expected": self.expect, "effect": self.effect * scale, "ci_low": self.low * scale,
            "ci_high": self.high * scale, "unit": self.unit, "ci_method": self.method,
            "detail": self.detail, "seeds": self.seeds_text(),
            "a": side(self.a, "name"), "n_a": side(self.a, "n_runs"),
            "completed_a": side(self.a, "n_completed"), "diverged_a": side(self.a, "n_diverged"),
            "b": side(self.b, "name"), "n_b": side(self.b, "n_runs"),
            "completed_b": side(self.b, "n_completed"), "diverged_b": side(self.b, "n_diverged"),
            "verdict": self.verdict, "reason": self.reason,
        }


def _seeds(g: Group) -> str:
    return f"{g.n_runs}" + (f" ({g.n_diverged} div.)" if g.n_diverged else "")


def judge_difference(claim: str, a: Group, b: Group, expect: Expect, *, unit: str = "pp",
                     comparison: str | None = None, confidence: float = CONFIDENCE) -> Judgement:
    """Claim "A - B lies ``expect`` 0" judged from two groups of seeds (see the module rule)."""
    comparison = comparison or f"{a.name} - {b.name}"
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect=expect, unit=unit, a=a, b=b)
    problems = [p for p in (a.describe(), b.describe()) if p]
    if problems:
        return replace(base, reason="; ".join(problems))
    ci = welch_interval(a.values, b.values, confidence)
    result = verdict(ci.low, ci.high, expect)
    if result == INCONCLUSIVE:
        reason = ("no difference (every seed of both sides equal)" if ci.low == ci.high == 0
                  else "CI touches 0" if 0 in (ci.low, ci.high) else "CI spans 0")
    else:
        winner = a if ci.low > 0 else b
        if winner.n_diverged:
            result = INCONCLUSIVE
            reason = (f"CI favours {winner.name}, but {winner.n_diverged} of its {winner.n_runs} "
                      f"seeds diverged (its mean is of survivors only)")
        else:
            above = ci.low > 0
            reason = f"CI {'above' if above else 'below'} 0: {a.name} {'higher' if above else 'lower'} than {b.name}"
            losers = [g for g in (a, b) if g is not winner and g.n_diverged]
            reason += "".join(f"; {g.name}: {g.n_diverged} of {g.n_runs} seeds also diverged"
                              for g in losers)
    return replace(base, verdict=result, reason=reason, effect=ci.effect, low=ci.low,
                   high=ci.high, method=ci.method)


# --------------------------------------------------------------------------------------------
# Stability over the learning-rate sweep (claims 1 and 2)


def stable_threshold(chance: float) -> float:
    return chance + STABLE_FRACTION * (1.0 - chance)


def stability(group: Group, chance: float) -> bool | None:
    """True/False for a sweep point with enough seeds, None when it has too few to judge."""
    if group.n_runs < MIN_SEEDS:
        return None
    return group.n_diverged == 0 and min(group.values) >= stable_threshold(chance)


Sweep = Mapping[float, Group]  # lr -> the variant's seeds at that lr


def _lrs(values: Iterable[float]) -> str:
    values = list(values)
    return ", ".join(f"{v:g}" for v in values) if values else "none"


def _common_points(sweeps: Mapping[str, Sweep], chance: float) -> tuple[list[float], dict, str]:
    """The lrs every variant has a judgeable point at, the stability there, and why any is
    missing ('' if none)."""
    missing = [name for name, s in sweeps.items() if not s]
    if missing:
        return [], {}, f"no learning-rate sweep of {', '.join(missing)}"
    status = {name: {lr: stability(g, chance) for lr, g in s.items()} for name, s in sweeps.items()}
    judged = [{lr for lr, ok in st.items() if ok is not None} for st in status.values()]
    common = sorted(set.intersection(*judged))
    if not common:
        return [], status, (f"no learning rate with >= {MIN_SEEDS} seeds of every one of "
                            f"{', '.join(sweeps)}")
    return common, status, ""


def _sweep_groups(sweep: Sweep, lrs: Sequence[float], name: str) -> Group:
    """All seeds of a variant over the given sweep points (for the pooled divergence rate)."""
    values, diverged = [], 0
    for lr in lrs:
        values += list(sweep[lr].values)
        diverged += sweep[lr].n_diverged
    return Group(name, tuple(values), diverged)


def judge_instability(plain: Sweep, bn: Sweep, chance: float, claim: str = "1") -> Judgement:
    """Claim 1: ``plain`` diverges or stays near chance where ``bn`` trains (module rule). The
    effect shown is the difference of divergence rates pooled over the common lrs."""
    comparison = "lr sweep: does plain fail where bn trains?"
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="plain fails where bn trains",
                     unit="rate")
    common, status, why = _common_points({"plain": plain, "bn": bn}, chance)
    if why:
        return replace(base, reason=why)
    a, b = _sweep_groups(plain, common, "plain"), _sweep_groups(bn, common, "bn")
    rate = rate_difference(a.n_diverged, a.n_runs, b.n_diverged, b.n_runs)
    base = replace(base, a=a, b=b, effect=rate.effect, low=rate.low, high=rate.high,
                   unit="pp", method=f"{rate.method} (divergence rate, lr {_lrs(common)})")
    bn_ok = [lr for lr in common if status["bn"][lr]]
    if not bn_ok:
        return replace(base, reason=f"bn is stable at no lr of the sweep ({_lrs(common)})")
    plain_fails = [lr for lr in bn_ok if not status["plain"][lr]]
    detail = f"bn stable at lr {_lrs(bn_ok)}; plain fails at lr {_lrs(plain_fails)}"
    if plain_fails:
        return replace(base, verdict=SUPPORTED, detail=detail,
                       reason=f"plain diverges or stays below {stable_threshold(chance):.0%} at lr "
                              f"{_lrs(plain_fails)}, where bn is stable")
    return replace(base, verdict=CONTRADICTED, detail=detail,
                   reason=f"plain is stable at every lr where bn is ({_lrs(bn_ok)})")


def highest_stable(status: Mapping[float, bool | None], lrs: Sequence[float]) -> float | None:
    ok = [lr for lr in lrs if status.get(lr)]
    return max(ok) if ok else None


def judge_stability(msr: Sweep, bn: Sweep, plain: Sweep, chance: float, claim: str = "2") -> Judgement:
    """Claim 2: ``msr``'s highest stable lr >= ``bn``'s and > ``plain``'s (module rule). A tie
    with ``plain`` is inconclusive; so is an ordering at the top of the sweep (censored)."""
    comparison = "lr sweep: highest stable lr, msr vs bn and plain"
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="msr >= bn, msr > plain", unit="lr")
    common, status, why = _common_points({"msr": msr, "bn": bn, "plain": plain}, chance)
    if why:
        return replace(base, reason=why)
    top = {name: highest_stable(status[name], common) for name in ("msr", "bn", "plain")}
    detail = ", ".join(f"{n} {'none' if v is None else f'{v:g}'}" for n, v in top.items()) + \
        f" (of lr {_lrs(common)})"
    groups = {n: _sweep_groups(s, common, n) for n, s in (("msr", msr), ("bn", bn), ("plain", plain))}
    base = replace(base, detail=detail, a=groups["msr"], b=groups["bn"], method=f"lr {_lrs(common)}",
                   seeds=" / ".join(_seeds(g) for g in groups.values()))
    if all(v is None for v in top.values()):
        return replace(base, reason=f"no variant is stable at any lr ({_lrs(common)})")
    rank = {n: (-math.inf if v is None else v) for n, v in top.items()}  # never stable: lowest
    reversed_ = [n for n in ("bn", "plain") if rank["msr"] < rank[n]]
    if reversed_:
        return replace(base, verdict=CONTRADICTED,
                       reason=f"msr's highest stable lr is below {' and '.join(reversed_)}'s")
    if rank["msr"] == rank["plain"]:
        edge = " - the top of the sweep, so it cannot tell them apart" if top["msr"] == max(common) else ""
        return replace(base, reason=f"msr and plain are stable up to the same lr{edge}")
    return replace(base, verdict=SUPPORTED, reason="msr's highest stable lr is >= bn's and > plain's")


# --------------------------------------------------------------------------------------------
# Claim 3: the test graph is the training graph


def judge_identity(max_abs_diff: float, scale: float, *, claim: str = "3", variant: str = "msr",
                   control: float | None = None, note: str = "") -> Judgement:
    """Train-mode vs eval-mode outputs of one model on the same input: supported when the
    largest difference is within IDENTITY_TOL x the largest output (``scale``). ``control``:
    the same number for ``bn``, shown to prove the test can see a difference."""
    comparison = f"{variant}: train-mode vs eval-mode output, same input"
    detail = f"max |difference| {max_abs_diff:.3g}" + \
        (f" (bn control: {control:.3g})" if control is not None else "")
    note = f"; {note}" if note else ""
    base = Judgement(claim, comparison, INCONCLUSIVE, "", expect="0", effect=max_abs_diff,
                     low=max_abs_diff, high=max_abs_diff, unit="abs", method="test", detail=detail)
    if not (math.isfinite(max_abs_diff) and math.isfinite(scale)):
        return replace(base, reason="the outputs are not finite")
    if max_abs_diff <= IDENTITY_TOL * max(scale, 1e-12):
        return replace(base, verdict=SUPPORTED,
                       reason=f"identical (largest |output| {scale:.3g}){note}")
    return replace(base, verdict=CONTRADICTED,
                   reason=f"the outputs differ by more than {IDENTITY_TOL:g} x the largest |output| "
                          f"({scale:.3g}){note}")


def train_eval_difference(variant: str, depth: int, num_classes: int, in_channels: int,
                          image_size: int, state_dict: Mapping | None = None,
                          overrides: Mapping | None = None, seed: int = 0) -> tuple[float, float]:
    """(max |train - eval output|, max |eval output|) of ``variant`` (trained weights from
    ``state_dict`` if given, else its initialization) on one fixed random batch of 8."""
    import torch

    from msr.core import variants

    torch.manual_seed(seed)
    model = variants.build(variant, depth=depth, num_classes=num_classes, in_channels=in_channels,
                           **dict(overrides or {})).model
    if state_dict is not None:
        model.load_state_dict(state_dict)
    x = torch.randn(8, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        eval_out = model(x)
    return float((train_out - eval_out).abs().max()), float(eval_out.abs().max())


# --------------------------------------------------------------------------------------------
# Table T3 from the aggregated runs


def classes_of(dataset: str, num_classes: Mapping[str, int] | None = None) -> int:
    """The number of classes of ``dataset`` (``num_classes`` adds to or overrides NUM_CLASSES)."""
    classes = {**NUM_CLASSES, **(num_classes or {})}
    if dataset not in classes:
        raise ValueError(f"number of classes of dataset {dataset!r} unknown: add it to "
                         f"msr.analysis.claims.NUM_CLASSES or pass num_classes={{{dataset!r}: N}}")
    return int(classes[dataset])


def chance_level(dataset: str, num_classes: Mapping[str, int] | None = None) -> float:
    return 1.0 / classes_of(dataset, num_classes)


def lr_sweep(runs: pd.DataFrame, variant: str) -> dict[float, Group]:
    """lr -> Group for ``variant`` in ``runs`` (one dataset/arch): the lr sweep's runs plus the
    main grid's, only if the variant has an lr sweep at all (a main-grid run alone is not a
    sweep)."""
    mine = runs[runs["variant"] == variant]
    if mine.empty or not (mine["sweep"] == "lr").any():
        return {}
    mine = mine[mine["sweep"].isin(["base", "lr"])]
    return {float(lr): group_of(g, variant) for lr, g in mine.groupby(mine["lr"].astype(float).round(10))}


def base_group(runs: pd.DataFrame, variant: str, metric: str = "final_test_acc") -> Group:
    return group_of(runs[(runs["sweep"] == "base") & (runs["variant"] == variant)], variant, metric)


def init_mean_shift(probes: pd.DataFrame, runs: pd.DataFrame, variant: str) -> Group:
    """Per seed of ``variant``'s main-grid runs: the mean shift of the deepest conv layer at
    step 0 (initialization; a run that later diverged still has it, so every seed counts)."""
    ids = runs.loc[(runs["sweep"] == "base") & (runs["variant"] == variant), "run_id"]
    p = probes[probes["run_id"].isin(ids) & (probes["metric"] == "mean_shift") & (probes["step"] == 0)]
    values = []
    for _, g in p.groupby("run_id", sort=True):
        values.append(float(g["value"].iloc[-1]))  # probes are recorded in forward order
    return Group(variant, tuple(v for v in values if math.isfinite(v)))


def judge_pair(runs: pd.DataFrame, chance: float, *,
               probes: pd.DataFrame | None = None,
               identity: Mapping[str, float | str] | None = None) -> list[Judgement]:
    """Every row of T3 for one dataset/arch (``runs`` already selected to it)."""
    rows: list[Judgement] = []
    have = set(runs["variant"])

    def diff(claim_id, a, b, expect):
        missing = [v for v in (a, b) if v not in have]
        if missing:
            return Judgement(claim_id, f"{a} - {b}", INCONCLUSIVE,
                             f"{', '.join(missing)} not in the runs", expect=expect, unit="pp")
        return judge_difference(claim_id, base_group(runs, a), base_group(runs, b), expect)

    # claim 1: instability without normalization, and its cause at init
    rows.append(judge_instability(lr_sweep(runs, "plain"), lr_sweep(runs, "bn"), chance))
    if probes is not None:
        a, b = init_mean_shift(probes, runs, "plain"), init_mean_shift(probes, runs, "msr")
        rows.append(judge_difference(
            "1", a, b, "above", unit="ratio",
            comparison="mean shift at init, deepest conv: plain - msr (= zmi at init)"))
    # claim 2: msr trains where plain cannot; ZMI/ZMG help on top of the affine scheme
    rows.append(judge_stability(lr_sweep(runs, "msr"), lr_sweep(runs, "bn"), lr_sweep(runs, "plain"), chance))
    rows.append(diff("2", "msr", "nf", "above"))
    # claim 3: the test graph is the training graph
    if identity is None:
        rows.append(Judgement("3", "msr: train-mode vs eval-mode output, same input", INCONCLUSIVE,
                              "not measured (no msr run for this dataset/arch)", expect="0"))
    else:
        rows.append(judge_identity(float(identity["diff"]), float(identity["scale"]),
                                   control=identity.get("control"), note=str(identity.get("note", ""))))
    # claims 4-6: accuracy differences on the main grid
    rows.append(diff("4", "msr_noise", "msr", "above"))
    rows.append(diff("4", "bn_noise", "bn", "above"))
    rows.append(diff("5", "msr_noise", "bn", "above"))
    rows += [diff("6", peer, "bn", "below") for peer in PEERS_CLAIM6]
    return rows


def claims_table(runs: pd.DataFrame, *, probes: pd.DataFrame | None = None,
                 identity: Mapping[tuple[str, str], Mapping] | None = None,
                 num_classes: Mapping[str, int] | None = None) -> pd.DataFrame:
    """T3: one row per claim (and per peer for claim 6) per dataset/arch of ``runs``
    (runs.csv). ``probes``: step-0 mean-shift probes of the main-grid runs (long format, as
    msr.analysis.aggregate.load_probes), for claim 1's mean-shift row; ``identity``: (dataset, arch) ->
    {"diff", "scale", "control", "note"} from :func:`train_eval_difference`, for claim 3."""
    rows = []
    pairs = runs[["dataset", "arch"]].drop_duplicates() if not runs.empty else pd.DataFrame(columns=["dataset", "arch"])
    pairs = sorted(zip(pairs["dataset"], pairs["arch"], strict=True),
                   key=lambda p: (p[0], depth_of_arch(p[1]) or 0, p[1]))
    for dataset, arch in pairs:
        here = runs[(runs["dataset"] == dataset) & (runs["arch"] == arch)]
        for j in judge_pair(here, chance_level(dataset, num_classes), probes=probes,
                            identity=(identity or {}).get((dataset, arch))):
            rows.append(replace(j, context={"dataset": dataset, "arch": arch}).row())
    columns = list(Judgement("", "", "", "", context={"dataset": "", "arch": ""}).row())
    table = pd.DataFrame(rows, columns=columns)
    counts = [f"{k}_{side}" for k in ("n", "completed", "diverged") for side in "ab"]
    return table.astype({c: "Int64" for c in counts})  # counts stay integers next to missing ones


def overrides_of(row: Mapping) -> dict:
    """A run's variant overrides from runs.csv (stored there as JSON)."""
    text = row.get("overrides")
    return json.loads(text) if isinstance(text, str) and text else {}
