"""msr.analysis.claims: the verdict rule and its statistics, on made-up runs for every branch."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from msr import outcome
from msr.analysis import claims
from msr.analysis.claims import (
    BASELINE_FAILED,
    BY_CONSTRUCTION,
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    Side,
)

CHANCE = 0.1  # 10 classes: a run fails below 55%


def runs_frame(rows) -> pd.DataFrame:
    """runs.csv-like rows on digits/resnet20 from (variant, tag, lr, seeds[, extra columns]).

    Each seed is (status, final test acc[, final clean train acc[, diverged_at_step]]); the clean
    train accuracy defaults to the test accuracy (NaN for a diverged run), the step to 10."""
    records = []
    for variant, tag, lr, seeds, *extra in rows:
        sweep = "base" if tag == "base" else "lr"
        for seed, spec in enumerate(seeds):
            status, acc, *rest = spec
            clean = rest[0] if rest else (acc if status == "completed" else math.nan)
            step = rest[1] if len(rest) > 1 else (10 if status == "diverged" else math.nan)
            records.append({"run_id": f"digits/resnet20/{variant}/{tag}/seed{seed}", "dataset": "digits",
                            "arch": "resnet20", "variant": variant, "tag": tag, "sweep": sweep, "lr": lr,
                            "seed": seed, "status": status,
                            "final_test_acc": acc if status == "completed" else 0.1,
                            "final_clean_train_acc": clean, "diverged_at_step": step,
                            **(extra[0] if extra else {})})
    return pd.DataFrame.from_records(records)


def ok(acc, clean=None):
    return ("completed", acc) if clean is None else ("completed", acc, clean)


def div(step=10):
    return ("diverged", math.nan, math.nan, step)


DIV = div()


# ------------------------------------------------------------------------------ failure


def test_failure_threshold_and_outcomes():
    assert claims.failure_threshold(0.1) == pytest.approx(0.55)
    assert claims.failure_threshold(0.01) == pytest.approx(0.505)
    assert claims.run_outcome("diverged", math.nan, 0.1) == claims.DIVERGED
    assert claims.run_outcome("completed", 0.549, 0.1) == claims.AT_CHANCE
    assert claims.run_outcome("completed", 0.55, 0.1) == claims.TRAINED
    assert outcome.run_failed("completed", 0.3, 0.1) and not outcome.run_failed("completed", 0.9, 0.1)
    assert outcome.run_failed("diverged", 0.99, 0.1)  # a diverged run failed whatever it scored before
    frame = pd.DataFrame({"status": ["completed", "diverged", "completed"], "final_test_acc": [0.9, 0.1, 0.2]})
    assert list(claims.outcomes(frame, 0.1)) == ["trained", "diverged", "at chance"]
    with pytest.raises(ValueError, match="'interrupted' is neither"):
        claims.run_outcome("interrupted", 0.5, 0.1)
    with pytest.raises(ValueError, match="damaged"):
        claims.run_outcome("completed", math.nan, 0.1)


def test_side_counts_every_run_and_the_kind_of_failure():
    frame = runs_frame([("bn", "base", 0.1, [ok(0.9), DIV, ok(0.3, 0.9), ok(0.8, 0.4), div(77)])])
    side = claims.side_of(frame, "bn", CHANCE)
    assert (side.n_runs, side.n_trained, side.n_diverged, side.n_at_chance) == (5, 2, 2, 1)
    assert side.values == (0.9, 0.8) and side.seeds == (0, 1, 2, 3, 4)
    assert side.diverged_steps() == [10, 77]
    # fits its training data: seeds 0 and 2 (seed 3 trained at test but its clean train acc is 0.4)
    assert [r.fits for r in side.runs] == [True, False, True, False, False]
    assert side.failed_to_train  # 2 of 5 reach 55% clean train accuracy: fewer than half
    assert side.counts_text() == "5 (2 div., 1 at chance)"
    with pytest.raises(ValueError, match="final_clean_train_acc"):
        claims.side_of(frame.drop(columns="final_clean_train_acc"), "bn", CHANCE)


# ------------------------------------------------------------------------------ the rule itself


@pytest.mark.parametrize("low, high, expect, margin, result", [
    (0.1, 0.3, "above", 0.005, SUPPORTED), (-0.3, -0.1, "above", 0.005, CONTRADICTED),
    (-0.3, -0.1, "below", 0.005, SUPPORTED), (0.1, 0.3, "below", 0.005, CONTRADICTED),
    (-0.1, 0.3, "above", 0.005, INCONCLUSIVE), (0.0, 0.3, "above", 0.005, INCONCLUSIVE),  # touching 0
    (-0.2, 0.0, "below", 0.005, INCONCLUSIVE), (math.nan, 0.3, "above", 0.005, INCONCLUSIVE),
    # equivalence within +-m contradicts a claim of a difference, whichever side it predicts
    (-0.003, 0.004, "above", 0.005, CONTRADICTED), (-0.003, 0.004, "below", 0.005, CONTRADICTED),
    (0.001, 0.004, "above", 0.005, CONTRADICTED),  # above 0, but by less than the margin
    (-0.004, -0.001, "below", 0.005, CONTRADICTED),  # a peer below bn by less than m reaches it
    (0.001, 0.006, "above", 0.005, SUPPORTED),  # not wholly inside the margin
    (-0.005, 0.004, "above", 0.005, INCONCLUSIVE),  # strictly inside, touching -m is not
    (0.0, 0.0, "above", 0.0, INCONCLUSIVE),  # no margin, no equivalence
])
def test_verdict_rule(low, high, expect, margin, result):
    assert claims.verdict(low, high, expect, margin) == result


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="expect must be"):
        claims.verdict(0.1, 0.2, "higher")


# ------------------------------------------------------------------------------ statistics


A6 = [0.912, 0.935, 0.921, 0.940, 0.918, 0.929]
B6 = [0.905, 0.921, 0.918, 0.925, 0.915, 0.913]


def test_paired_t_matches_scipy_ttest_rel():
    ci = claims.paired_t(A6, B6, margin=0.005)
    ref = stats.ttest_rel(A6, B6)
    assert ci.effect == pytest.approx(np.mean(np.subtract(A6, B6)))
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert ci.p == pytest.approx(ref.pvalue) and ci.n == 6 and ci.method == "paired t"
    d = np.subtract(A6, B6)
    tost = max(stats.ttest_1samp(d, -0.005, alternative="greater").pvalue,
               stats.ttest_1samp(d, 0.005, alternative="less").pvalue)
    assert ci.p_tost == pytest.approx(tost)


def test_welch_t_matches_scipy():
    a, b = [0.91, 0.93, 0.95, 0.90], [0.85, 0.80, 0.88]
    ci = claims.welch_t(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert ci.effect == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert (ci.low, ci.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert ci.p == pytest.approx(ref.pvalue) and ci.method == "Welch t"
    with pytest.raises(ValueError, match=">= 2 values per side"):
        claims.welch_t([0.9], [0.8, 0.7])


def test_constant_differences_give_a_point():
    ci = claims.paired_t([0.875, 0.75, 0.625], [0.625, 0.5, 0.375], margin=0.5)  # exact in binary
    assert ci.low == ci.high == 0.25 and ci.p == 0.0 and ci.p_tost == 0.0
    assert claims.paired_t([0.875, 0.75, 0.625], [0.625, 0.5, 0.375], margin=0.25).p_tost == 1.0
    assert claims.welch_t([0.9, 0.9], [0.8, 0.8, 0.8]).low == pytest.approx(0.1)


def _brute_signflip_p(d, delta):
    """One-sided p-values by enumerating every sign vector: P(T_s >= T_0), P(T_s <= T_0)."""
    e = np.asarray(d) - delta
    t0 = e.sum()
    sums = np.array([np.dot(s, e) for s in itertools.product((1, -1), repeat=len(e))])
    return np.mean(sums >= t0 - 1e-12), np.mean(sums <= t0 + 1e-12)


def test_signflip_interval_inverts_the_enumerated_test():
    d = [0.012, -0.004, 0.021, 0.009, 0.015, 0.003, 0.018]
    ci = claims.signflip(d, margin=0.005)
    k = math.floor(0.025 * 2**7)  # 3 subset means cut off each tail
    assert k == 3
    # the limits: no delta inside the interval is rejected, every delta just outside is
    for delta in np.linspace(ci.low, ci.high, 25):
        up, down = _brute_signflip_p(d, delta)
        assert up > 0.025 and down > 0.025
    assert _brute_signflip_p(d, ci.low - 1e-6)[0] <= 0.025
    assert _brute_signflip_p(d, ci.high + 1e-6)[1] <= 0.025
    up, down = _brute_signflip_p(d, 0.0)
    assert ci.p == pytest.approx(min(1, 2 * min(up, down)))
    assert ci.p_tost == pytest.approx(max(_brute_signflip_p(d, -0.005)[0], _brute_signflip_p(d, 0.005)[1]))
    # n = 6: the 95% interval is [min d, max d] (coverage 62/64), p never below 2/64
    six = claims.signflip(np.subtract(A6, B6))
    assert (six.low, six.high) == pytest.approx((min(np.subtract(A6, B6)), max(np.subtract(A6, B6))))
    assert six.p == pytest.approx(2 / 64) and six.method == "sign-flip exact"
    with pytest.raises(ValueError, match=">= 6 differences"):
        claims.signflip([0.1, 0.2, 0.3, 0.4, 0.5])


def test_signflip_monte_carlo_beyond_the_exact_limit():
    d = np.random.default_rng(1).normal(0.01, 0.01, size=12)
    exact = claims.signflip(d)
    mc = claims.signflip(d, exact_max=8, draws=20000)
    assert mc.method.startswith("sign-flip Monte Carlo")
    assert (mc.low, mc.high) == pytest.approx((exact.low, exact.high), abs=2e-3)
    assert mc.low < np.mean(d) < mc.high


def test_holm_against_a_hand_computation():
    p = [0.01, 0.04, 0.03, math.nan, 0.005]
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) -> max(0.04, 0.06) = 0.06
    adj = claims.holm(p)
    assert adj[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert math.isnan(adj[3])
    assert list(claims.holm([0.6, 0.7])) == [1.0, 1.0]  # capped at 1


def test_fisher_on_failure_rates_only_where_they_differ():
    a, b = Side.of("a", [0.9] * 2, diverged=3), Side.of("b", [0.9] * 5)
    assert claims.fisher_failures(a, b) == pytest.approx(stats.fisher_exact([[3, 2], [0, 5]]).pvalue)
    assert math.isnan(claims.fisher_failures(Side.of("a", [0.9], diverged=1), Side.of("b", [0.8, 0.8], at_chance=2)))


def test_rate_difference_newcombe_published_example():
    # Newcombe (1998), Stat. Med. 17:873, Table II example (b): 56/70 - 48/80, method 10
    ci = claims.rate_difference(56, 70, 48, 80)
    assert ci.effect == pytest.approx(0.2)
    assert (ci.low, ci.high) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    extreme = claims.rate_difference(3, 3, 0, 3)  # all vs none: stays inside [-1, 1]
    assert 0 < extreme.low < extreme.high <= 1


# ------------------------------------------------------------------------ accuracy differences


HI3, LO3 = [0.97, 0.975, 0.972], [0.95, 0.951, 0.949]


def test_paired_supported_matches_ttest_rel_and_says_it_shares_the_init():
    j = claims.judge_difference("4", Side.of("msr_noise", HI3), Side.of("msr", LO3), "above")
    ref = stats.ttest_rel(HI3, LO3)
    assert j.verdict == SUPPORTED and j.reason == "CI above 0: msr_noise higher than msr"
    assert (j.low, j.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert j.p == pytest.approx(ref.pvalue) and j.p_holm == pytest.approx(ref.pvalue) and j.holm_m == 1
    assert j.pairing == "paired" and j.shares_init is True and j.n_test == 3
    assert j.p_test == "two-sided paired t" and math.isnan(j.alt_low)  # no sign-flip below 6 pairs
    row = j.row()
    assert row["effect"] == pytest.approx(100 * np.mean(np.subtract(HI3, LO3)))
    assert row["margin"] == pytest.approx(0.5)
    other = claims.judge_difference("5", Side.of("msr_noise", HI3), Side.of("bn", LO3), "above")
    assert other.pairing == "paired" and other.shares_init is False


def test_unpaired_welch_when_the_seeds_differ():
    a = Side.of("msr", [0.93, 0.94, 0.935], seeds=[0, 1, 2])
    b = Side.of("nf", [0.60, 0.70, 0.65], seeds=[3, 4, 5])
    j = claims.judge_difference("2", a, b, "above")
    ref = stats.ttest_ind(a.values, b.values, equal_var=False)
    assert j.pairing == "unpaired" and j.shares_init is False and "seeds differ" in j.detail
    assert (j.low, j.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert j.p == pytest.approx(ref.pvalue) and j.verdict == SUPPORTED and j.p_test == "two-sided Welch t"


def test_pairs_are_seeds_where_both_trained():
    # 4 seeds each, but seed 1 failed on one side and seed 2 on the other: 2 pairs are left
    a = Side.of("msr_noise", [0.97, 0.975, 0.972], at_chance=1, seeds=[0, 2, 3, 1])
    b = Side.of("msr", [0.95, 0.951, 0.949], diverged=1, seeds=[0, 1, 3, 2])
    j = claims.judge_difference("4", a, b, "above")
    assert j.verdict == "inconclusive (n = 2)" and j.pairing == "paired" and j.n_test == 2
    assert j.reason.startswith("2 seeds where both trained, 3 needed")
    assert math.isnan(j.p) and math.isnan(j.effect)


def test_fewer_than_three_trained_seeds_is_inconclusive_unpaired_too():
    j = claims.judge_difference("2", Side.of("msr", [0.9, 0.91], seeds=[0, 1]),
                                Side.of("nf", [0.8, 0.81, 0.82], seeds=[5, 6, 7]), "above")
    assert j.verdict == "inconclusive (n = 2)" and j.pairing == "unpaired"


def test_missing_variant_is_inconclusive_n0():
    j = claims.judge_difference("4", Side("bn_noise"), Side.of("bn", HI3), "above")
    assert j.verdict == "inconclusive (n = 0)" and j.reason == "bn_noise not in the runs"


def test_all_failed_side_failed_to_train_or_at_chance():
    bn = Side.of("bn", [0.95, 0.96, 0.955])
    j = claims.judge_difference("6", Side.of("fixup", diverged=3), bn, "below")
    assert j.verdict == BASELINE_FAILED and "fixup: 3 of 3 runs under" in j.reason
    assert j.fisher_p == pytest.approx(stats.fisher_exact([[3, 0], [0, 3]]).pvalue)
    assert "Fisher p" in j.reason and math.isnan(j.p)
    # all at chance on test but fitting the training data (overfit): not "failed to train"
    overfit = Side("wn", tuple(claims.Run(s, claims.AT_CHANCE, 0.3, True) for s in range(3)))
    j = claims.judge_difference("6", overfit, bn, "below")
    assert j.verdict == "inconclusive (n = 0)"
    assert (j.row()["trained_a"], j.row()["at_chance_a"]) == (0, 3)


def test_baseline_failed_to_train_takes_precedence_over_a_clear_difference():
    # wn: 3 of 5 runs never fit their training data; the 2 that did are far below bn
    wn = Side.of("wn", [0.60, 0.62, 0.61, 0.6, 0.59], unfit=3)
    j = claims.judge_difference("6", wn, Side.of("bn", [0.95, 0.96, 0.955, 0.95, 0.96]), "below")
    assert j.verdict == BASELINE_FAILED and j.reason.startswith("wn: 3 of 5 runs under")
    # 2 of 5 unfit: a majority fits, so the comparison runs (and supports the claim)
    wn2 = Side.of("wn", [0.60, 0.62, 0.61, 0.6, 0.59], unfit=2)
    assert claims.judge_difference("6", wn2, Side.of("bn", [0.95, 0.96, 0.955, 0.95, 0.96]), "below").verdict == SUPPORTED


def test_equivalence_inside_the_margin_contradicts_a_claim_of_difference():
    a = [0.950, 0.953, 0.951, 0.952]
    b = [0.951, 0.952, 0.951, 0.951]
    j = claims.judge_difference("4", Side.of("msr_noise", a), Side.of("msr", b), "above")
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert -0.005 < ref.low and ref.high < 0.005
    assert j.verdict == CONTRADICTED and j.reason == "equivalent: CI inside +-0.5 pp"
    d = np.subtract(a, b)
    tost = max(stats.ttest_1samp(d, -0.005, alternative="greater").pvalue,
               stats.ttest_1samp(d, 0.005, alternative="less").pvalue)
    assert j.p == pytest.approx(tost) and j.p_test.startswith("TOST")
    # claim 6 ("does not reach bn"): a peer equivalent to bn reaches it -> contradicted
    peer = claims.judge_difference("6", Side.of("skipinit", a), Side.of("bn", b), "below")
    assert peer.verdict == CONTRADICTED and peer.reason.startswith("equivalent")
    # a wider margin per dataset, a narrower one: the same data is no longer equivalent
    narrow = claims.judge_difference("4", Side.of("msr_noise", a), Side.of("msr", b), "above", margin=0.0005)
    assert narrow.verdict == INCONCLUSIVE and narrow.reason == "CI spans 0"


def test_identical_sides_are_equivalent():
    j = claims.judge_difference("4", Side.of("msr_noise", HI3), Side.of("msr", HI3), "above")
    assert j.verdict == CONTRADICTED and j.effect == 0 and j.low == j.high == 0


def test_wrong_side_contradicts():
    j = claims.judge_difference("5", Side.of("msr_noise", LO3), Side.of("bn", HI3), "above")
    assert j.verdict == CONTRADICTED and j.reason == "CI below 0: bn higher than msr_noise"
    j = claims.judge_difference("6", Side.of("wn", HI3), Side.of("bn", LO3), "below")
    assert j.verdict == CONTRADICTED


def test_survivors_never_carry_a_verdict():
    # msr_noise's 3 survivors beat bn, but 2 of its 5 runs diverged and none of bn's did
    survivors = Side.of("msr_noise", HI3, diverged=2, seeds=[0, 1, 2, 3, 4])
    bn = Side.of("bn", LO3 + [0.95, 0.95])
    j = claims.judge_difference("5", survivors, bn, "above")
    assert j.verdict == INCONCLUSIVE and "msr_noise failed more often (2/5 vs 0/5)" in j.reason
    # the side that failed more often loses anyway: the verdict stands
    j = claims.judge_difference("6", Side.of("wn", [0.80, 0.81, 0.805], diverged=1), Side.of("bn", LO3 + [0.95]), "below")
    assert j.verdict == SUPPORTED and "failures wn 1/4 vs bn 0/4" in j.reason


def test_signflip_interval_from_six_pairs_and_it_must_agree():
    j = claims.judge_difference("4", Side.of("msr_noise", A6), Side.of("msr", B6), "above")
    d = np.subtract(A6, B6)
    assert (j.alt_low, j.alt_high) == pytest.approx((d.min(), d.max()))
    assert (j.low, j.high) == pytest.approx(tuple(stats.ttest_rel(A6, B6).confidence_interval(0.95)))
    assert j.verdict == SUPPORTED and "sign-flip exact" in j.method
    assert j.p == pytest.approx(stats.ttest_rel(A6, B6).pvalue)  # the t test decides
    # the t interval excludes 0, the sign-flip one does not (one pair the other way)
    b = list(A6[:5]) + [A6[5] + 0.001]
    a = [x + 0.02 for x in A6[:5]] + [A6[5]]
    disagree = claims.judge_difference("4", Side.of("msr_noise", a), Side.of("msr", b), "above")
    assert stats.ttest_rel(a, b).confidence_interval(0.95).low > 0.005
    assert disagree.alt_low < 0 < disagree.alt_high
    assert disagree.verdict == INCONCLUSIVE and "sign-flip exact interval" in disagree.reason
    assert "disagrees" in disagree.reason


def test_intervals_are_clipped_to_the_feasible_range():
    a, b = [0.99, 0.56, 0.99], [0.56, 0.96, 0.56]  # differences 0.43, -0.40, 0.43: t CI beyond +-1
    raw = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert raw.low < -1 and raw.high > 1
    j = claims.judge_difference("2", Side.of("msr", a), Side.of("nf", b), "above")
    assert (j.low, j.high) == (-1.0, 1.0) and j.clipped is True
    assert "clipped to [-100, +100]" in j.method
    row = j.row()
    assert (row["ci_low"], row["ci_high"]) == (-100.0, 100.0)
    assert j.verdict == INCONCLUSIVE
    ci, clipped = claims.clip(claims.Interval(0.5, 0.2, 0.8, "x"))
    assert not clipped and (ci.low, ci.high) == (0.2, 0.8)


def test_holm_over_the_rows_of_one_claim():
    j1 = claims.judge_difference("6", Side.of("wn", [0.90, 0.91, 0.905, 0.9]), Side.of("bn", [0.95, 0.951, 0.949, 0.95]), "below")
    j2 = claims.judge_difference("6", Side.of("fixup", [0.940, 0.937, 0.943]), Side.of("bn", [0.950, 0.946, 0.948]), "below")
    j3 = claims.judge_difference("6", Side.of("skipinit", [0.93, 0.96, 0.94]), Side.of("bn", [0.95, 0.951, 0.949]), "below")
    assert j1.verdict == j2.verdict == SUPPORTED and j1.p < j2.p < 0.05 < j3.p
    rows = claims.apply_holm([j1, j2, j3])
    m = 3
    expect2 = max(m * j1.p, (m - 1) * j2.p)
    assert rows[0].p_holm == pytest.approx(min(1, m * j1.p))
    assert rows[1].p_holm == pytest.approx(min(1, expect2))
    assert rows[2].p_holm == pytest.approx(min(1, max(expect2, j3.p)))
    assert [r.holm_m for r in rows] == [3, 3, 3]
    assert expect2 > 0.05  # j2 no longer stands after the correction
    assert rows[0].verdict == SUPPORTED and rows[1].verdict == INCONCLUSIVE
    assert "Holm-adjusted p" in rows[1].reason and "3 tests in claim 6" in rows[1].reason
    assert claims.apply_holm(rows) == rows  # idempotent


# ------------------------------------------------------------------ stability (claims 1 and 2)


GOOD, BAD, STUCK = [ok(0.95), ok(0.96)], [DIV, DIV], [ok(0.11), ok(0.10)]


def sweep(*points):
    """{point: Side} from (point, seeds)."""
    return {x: claims.side_of(runs_frame([("v", "lrx", x, seeds)]), "v", CHANCE) for x, seeds in points}


def test_point_stable_needs_every_run_trained():
    assert claims.point_stable(sweep((1, GOOD))[1]) is True
    assert claims.point_stable(sweep((1, [ok(0.95), DIV]))[1]) is False
    assert claims.point_stable(sweep((1, [ok(0.95), ok(0.54)]))[1]) is False  # one at chance
    assert claims.point_stable(sweep((1, [ok(0.95)]))[1]) is None  # too few to judge
    assert claims.point_stable(sweep((1, GOOD))[1], min_seeds=3) is None


def test_claim1_supported_when_plain_trains_low_and_fails_where_bn_trains():
    plain = sweep((0.01, GOOD), (0.025, GOOD), (0.1, [ok(0.9), DIV]), (0.4, STUCK))
    bn = sweep((0.01, GOOD), (0.025, GOOD), (0.1, GOOD), (0.4, GOOD))
    j = claims.judge_instability(plain, bn)
    assert j.verdict == SUPPORTED
    assert j.reason == "plain trains at lr 0.01, 0.025 and fails at 0.1, 0.4, where bn is stable"
    assert j.detail == ("bn stable at lr 0.01, 0.025, 0.1, 0.4; plain stable at 0.01, 0.025; "
                        "plain fails where bn is stable at 0.1, 0.4")
    # failure rates pooled over the sweep: plain 3/8 (1 diverged, 2 at chance), bn 0/8
    assert j.effect == pytest.approx(3 / 8) and j.low < 3 / 8 < j.high
    assert j.fisher_p == pytest.approx(stats.fisher_exact([[3, 5], [0, 8]]).pvalue)
    assert (j.a.n_diverged, j.a.n_at_chance, j.b.n_runs) == (1, 2, 8)


def test_claim1_plain_failing_everywhere_is_initialization_not_lr():
    plain = sweep((0.01, [div(30), div(50)]), (0.025, [div(12), div(40)]), (0.1, [div(8), ok(0.1)]))
    bn = sweep((0.01, GOOD), (0.025, GOOD), (0.1, GOOD))
    j = claims.judge_instability(plain, bn)
    assert j.verdict == INCONCLUSIVE
    assert j.reason == ("plain fails at every lr tried (0.01, 0.025, 0.1): initialization, not lr; "
                        "5 of 6 runs diverged (diverged at step median 30, range 8-50), 1 ended at chance")


def test_claim1_contradicted_and_inconclusive_branches():
    same = sweep((0.05, GOOD), (0.1, GOOD), (0.4, BAD))
    j = claims.judge_instability(same, same)
    assert j.verdict == CONTRADICTED and "stable at every lr where bn is (0.05, 0.1)" in j.reason
    assert claims.judge_instability({}, same).reason == "no learning-rate sweep of plain"
    j = claims.judge_instability(sweep((0.1, GOOD), (0.4, BAD)), sweep((0.1, STUCK), (0.4, BAD)))
    assert j.verdict == INCONCLUSIVE and "bn is stable at no lr" in j.reason
    j = claims.judge_instability(sweep((0.1, [DIV])), sweep((0.1, [ok(0.9)])))
    assert j.verdict == INCONCLUSIVE and "no sweep point with >= 2 runs" in j.reason
    # plain fails only below where it trains: not the claim's shape
    odd = claims.judge_instability(sweep((0.01, BAD), (0.1, GOOD)), sweep((0.01, GOOD), (0.1, GOOD)))
    assert odd.verdict == INCONCLUSIVE and "only below" in odd.reason


def test_stability_profile_widest_contiguous_run():
    grid = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    status = {0.125: True, 0.25: False, 0.5: True, 1: True, 2: True, 4: False, 8: True}
    prof = claims.stability_profile(status, grid)
    assert prof.highest == 8 and (prof.range_low, prof.range_high) == (0.5, 2) and prof.octaves == 2
    assert claims.stability_profile({1: True}, [1]).octaves == 0
    none = claims.stability_profile({1: False}, [1])
    assert none.highest is None and none.octaves is None


FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def factor_sweep(variant, default_lr, stable_factors):
    """runs.csv rows of a factor sweep: main grid (factor 1) + sweep points; stable where listed."""
    rows = []
    for f in FACTORS:
        tag = "base" if f == 1.0 else f"lr{default_lr * f:g}"
        rows.append((variant, tag, default_lr * f, GOOD if f in stable_factors else BAD, {"lr_factor": f}))
    return rows


def test_claim2_by_factor_highest_stable_and_octaves():
    runs = runs_frame(factor_sweep("msr", 0.4, {0.25, 0.5, 1.0, 2.0, 4.0})
                      + factor_sweep("bn", 0.1, {0.25, 0.5, 1.0, 2.0})
                      + factor_sweep("plain", 0.1, {0.25}))
    assert claims.sweep_key(runs) == ("lr_factor", "lr factor")
    sweeps = {v: claims.lr_sweep(runs, v, CHANCE, "lr_factor") for v in ("msr", "bn", "plain")}
    assert sorted(sweeps["msr"]) == list(FACTORS)  # by factor, although msr's lrs are 4x bn's
    j = claims.judge_stability(sweeps["msr"], sweeps["bn"], sweeps["plain"], key="lr factor")
    assert j.verdict == SUPPORTED
    assert j.detail == ("msr highest 4, range 0.25-4 (4 oct.); bn highest 2, range 0.25-2 (3 oct.); "
                        "plain highest 0.25, range 0.25-0.25 (0 oct.) (of lr factor 0.25, 0.5, 1, 2, 4)")
    assert "by lr factor" in j.method and "lr factor" in j.comparison
    # absolute lr without lr_factor: msr (0.1-1.6) and bn (0.025-0.4) share only 0.1-0.4
    absolute = runs.drop(columns="lr_factor")
    assert claims.sweep_key(absolute) == ("lr", "lr")
    partial = runs.assign(lr_factor=runs["lr_factor"].where(runs["sweep"] == "base"))  # sweep rows lack it
    assert claims.sweep_key(partial) == ("lr", "lr")
    assert sorted(claims.lr_sweep(absolute, "msr", CHANCE)) == [0.1, 0.2, 0.4, 0.8, 1.6]


def test_claim2_contradicted_when_msr_is_narrower_or_lower():
    runs = runs_frame(factor_sweep("msr", 0.4, {2.0, 4.0}) + factor_sweep("bn", 0.1, {0.25, 0.5, 1.0, 2.0})
                      + factor_sweep("plain", 0.1, {0.25}))
    sw = {v: claims.lr_sweep(runs, v, CHANCE, "lr_factor") for v in ("msr", "bn", "plain")}
    j = claims.judge_stability(sw["msr"], sw["bn"], sw["plain"])
    assert j.verdict == CONTRADICTED and j.reason == "msr's stable range below bn's"
    lower = runs_frame(factor_sweep("msr", 0.4, {0.25, 0.5}) + factor_sweep("bn", 0.1, {0.25, 0.5, 1.0, 2.0})
                       + factor_sweep("plain", 0.1, {0.25}))
    sw = {v: claims.lr_sweep(lower, v, CHANCE, "lr_factor") for v in ("msr", "bn", "plain")}
    j = claims.judge_stability(sw["msr"], sw["bn"], sw["plain"])
    assert j.verdict == CONTRADICTED and j.reason == "msr's highest stable below bn's and stable range below bn's"


def test_claim2_inconclusive_branches():
    everything = sweep((0.1, GOOD), (0.4, GOOD))
    tie = claims.judge_stability(everything, everything, everything)
    assert tie.verdict == INCONCLUSIVE and "ties with plain's" in tie.reason and "censored" in tie.reason
    nothing = sweep((0.1, BAD))
    assert "no variant is stable" in claims.judge_stability(nothing, nothing, nothing).reason
    missing = claims.judge_stability(everything, {}, {})
    assert missing.verdict == INCONCLUSIVE and missing.reason == "no learning-rate sweep of bn, plain"


# --------------------------------------------------------------------------------- claim 3


def test_msr_mode_free_is_by_construction_unless_measured_otherwise():
    j = claims.judge_msr_mode_free({"diff": 0.0, "scale": 5.0})
    assert j.verdict == BY_CONSTRUCTION and j.detail == "measured max |train - eval| 0" and math.isnan(j.p)
    assert claims.judge_msr_mode_free(None).verdict == BY_CONSTRUCTION
    bug = claims.judge_msr_mode_free({"diff": 0.3, "scale": 5.0})
    assert bug.verdict == CONTRADICTED and "a bug" in bug.reason


def test_msr_noise_identity_with_the_bn_control():
    assert claims.judge_identity(0.0, 5.0, control=2.0).verdict == SUPPORTED
    j = claims.judge_identity(0.3, 5.0, control=2.0)
    assert j.verdict == CONTRADICTED and j.detail == "max |difference| 0.3 (bn control: 2)"
    assert claims.judge_identity(math.nan, 5.0, control=2.0).verdict == INCONCLUSIVE
    blind = claims.judge_identity(0.0, 5.0, control=0.0)
    assert blind.verdict == INCONCLUSIVE and "sees no difference" in blind.reason
    assert claims.judge_identity(0.0, 5.0).verdict == INCONCLUSIVE  # no control: unchecked


def test_train_eval_differences_measured_on_built_models():
    shape = dict(depth=8, num_classes=10, in_channels=1, image_size=8)
    diff, scale = claims.train_eval_difference("msr", **shape)
    assert diff == 0.0 and scale > 0
    # msr_noise: eval == train-mode without noise, while train mode with noise differs
    same, noise_scale = claims.train_eval_difference("msr_noise", **shape, train_overrides={"noise_delta": 0})
    noisy, _ = claims.train_eval_difference("msr_noise", **shape)
    assert same == 0.0 and noise_scale > 0 and noisy > 1e-3
    bn_diff, _ = claims.train_eval_difference("bn", **shape)
    assert bn_diff > 1e-3  # the control: the test can see a difference where there is one


def test_shares_init_pairs_build_the_same_weights_from_one_seed():
    import torch

    from msr.core import variants

    for noisy, plain in sorted(claims.SHARES_INIT):
        states = []
        for name in (noisy, plain):
            torch.manual_seed(3)
            states.append(variants.build(name, depth=8, num_classes=10, in_channels=1).model.state_dict())
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(3)
    other = variants.build("bn", depth=8, num_classes=10, in_channels=1).model.state_dict()
    torch.manual_seed(3)
    msr = variants.build("msr_noise", depth=8, num_classes=10, in_channels=1).model.state_dict()
    assert other.keys() != msr.keys()  # msr_noise and bn: the same data order, not the same init


# ----------------------------------------------------------------------------- the whole table


GOOD3 = [ok(0.95), ok(0.96), ok(0.955)]


def full_runs():
    return runs_frame([
        ("bn", "base", 0.1, GOOD3), ("msr", "base", 0.4, [ok(0.93), ok(0.94), ok(0.935)]),
        ("nf", "base", 0.4, [ok(0.6), ok(0.7), ok(0.65)]), ("msr_noise", "base", 0.4, [ok(0.90), DIV, DIV]),
        ("wn", "base", 0.1, [ok(0.80), ok(0.81), ok(0.82)]), ("fixup", "base", 0.1, [DIV, DIV, DIV]),
        ("plain", "base", 0.1, [DIV, DIV, DIV]), ("skipinit", "base", 0.1, [ok(0.95), ok(0.9), ok(0.97)]),
        ("bn", "lr0.4", 0.4, GOOD), ("plain", "lr0.4", 0.4, BAD), ("msr", "lr0.1", 0.1, GOOD),
        ("plain", "lr0.025", 0.025, GOOD), ("bn", "lr0.025", 0.025, GOOD), ("msr", "lr0.025", 0.025, GOOD),
    ])


IDENTITY = {("digits", "resnet20"): {"msr": {"diff": 0.0, "scale": 3.0}, "msr_noise": {"diff": 0.0, "scale": 3.0},
                                     "bn": {"diff": 1.5, "scale": 3.0}}}


def test_claims_table_rows_columns_and_verdicts():
    table = claims.claims_table(full_runs(), identity=IDENTITY, margins={"digits": 0.01})
    assert list(table["claim"]) == ["1", "1", "2", "2", "3", "3", "4", "4", "5", "6", "6", "6"]
    assert list(table.columns) == claims.COLUMNS
    for col in claims.COUNT_COLUMNS:
        assert str(table[col].dtype) == "Int64"
    by = {(r.claim, r.comparison.split(":")[0]): r for r in table.itertuples()}
    assert by[("1", "lr sweep")].verdict == SUPPORTED  # plain trains at 0.025, fails at 0.1, 0.4
    assert by[("1", "mean shift at init, deepest conv")].verdict == BY_CONSTRUCTION
    assert by[("2", "lr sweep")].verdict == SUPPORTED
    nf = by[("2", "msr - nf")]
    assert nf.verdict == SUPPORTED and nf.pairing == "paired" and nf.margin == pytest.approx(1.0)  # pp
    assert nf.effect == pytest.approx(100 * (0.935 - 0.65)) and nf.p_holm == pytest.approx(nf.p)
    assert by[("3", "msr")].verdict == BY_CONSTRUCTION and by[("3", "msr_noise")].verdict == SUPPORTED
    noise = by[("4", "msr_noise - msr")]
    assert noise.verdict == BASELINE_FAILED  # 2 of 3 msr_noise runs diverged
    assert (noise.trained_a, noise.diverged_a, noise.at_chance_a) == (1, 2, 0)
    assert noise.pairing == "paired" and bool(noise.shares_init) and noise.fisher_p == pytest.approx(0.4)
    assert by[("4", "bn_noise - bn")].verdict == "inconclusive (n = 0)"
    assert by[("4", "bn_noise - bn")].reason == "bn_noise not in the runs"
    assert by[("6", "wn - bn")].verdict == SUPPORTED and by[("6", "wn - bn")].holm_m == 2
    assert by[("6", "fixup - bn")].verdict == BASELINE_FAILED  # never trained: credits nothing
    assert by[("6", "skipinit - bn")].verdict == INCONCLUSIVE
    p6 = [by[("6", f"{peer} - bn")].p for peer in ("wn", "skipinit")]
    assert [by[("6", f"{peer} - bn")].p_holm for peer in ("wn", "skipinit")] == pytest.approx(list(claims.holm(p6)))
    assert table["reason"].str.len().min() > 0 and set(table["dataset"]) == {"digits"}


def test_claims_table_two_archs_and_no_sweep():
    runs = full_runs()
    shallow = runs.assign(arch="resnet8", run_id=runs["run_id"].str.replace("resnet20", "resnet8"))
    both = claims.claims_table(pd.concat([runs, shallow[shallow["variant"] != "wn"]]))
    assert list(both["arch"]) == ["resnet8"] * 12 + ["resnet20"] * 12  # shallower first
    assert both.iloc[9]["reason"] == "wn not in the runs" and both.iloc[21]["verdict"] == SUPPORTED
    assert both.iloc[5]["reason"] == "not measured"  # no identity given
    flat = claims.claims_table(runs[runs["sweep"] == "base"])
    assert flat.iloc[0]["reason"] == "no learning-rate sweep of plain, bn"
    assert flat.iloc[2]["reason"] == "no learning-rate sweep of msr, bn, plain"


def test_claims_table_accepts_the_old_flat_identity():
    table = claims.claims_table(full_runs(), identity={("digits", "resnet20"): {"diff": 0.0, "scale": 3.0, "control": 1.5}})
    assert table.iloc[4]["verdict"] == BY_CONSTRUCTION and table.iloc[5]["reason"] == "not measured"


def test_mean_shift_row_is_by_construction_with_the_measurement():
    runs = runs_frame([("plain", "base", 0.1, [DIV, DIV]), ("msr", "base", 0.4, [ok(0.9), ok(0.9)])])
    probes = pd.DataFrame([
        {"run_id": rid, "step": step, "layer": layer, "metric": "mean_shift", "value": value}
        for rid, base in (("digits/resnet20/plain/base/seed0", 0.8), ("digits/resnet20/plain/base/seed1", 0.9),
                          ("digits/resnet20/msr/base/seed0", 0.1), ("digits/resnet20/msr/base/seed1", 0.12))
        for step, layer, value in ((0, "stem", 0.05), (0, "blocks.8.conv2", base), (10, "blocks.8.conv2", 5.0))
    ])
    table = claims.claims_table(runs, probes=probes)
    row = table[table["comparison"].str.startswith("mean shift")].iloc[0]
    assert row["effect"] == pytest.approx(0.85 - 0.11)  # deepest layer at step 0, unscaled ratio
    assert row["unit"] == "ratio" and row["verdict"] == BY_CONSTRUCTION and row["pairing"] == "paired"
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(stats.ttest_rel([0.8, 0.9], [0.1, 0.12]).confidence_interval()))
    assert (row["n_a"], row["diverged_a"]) == (2, 0)  # plain diverged later, but its init counts
    assert pd.isna(row["p"]) and pd.isna(row["p_holm"])  # a fact, not a test
    # msr measurably more shifted than plain: the construction is broken
    swapped = probes.assign(run_id=probes["run_id"].map(
        lambda r: r.replace("plain", "TMP").replace("msr", "plain").replace("TMP", "msr")))
    bug = claims.claims_table(runs, probes=swapped)
    bug = bug[bug["comparison"].str.startswith("mean shift")].iloc[0]
    assert bug["verdict"] == CONTRADICTED and "a bug" in bug["reason"]


def test_chance_level_names_an_unknown_dataset():
    assert claims.chance_level("cifar100") == pytest.approx(0.01)
    assert claims.chance_level("mnist", {"mnist": 10}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'mnist' unknown"):
        claims.chance_level("mnist")


def test_importing_claims_does_not_import_torch():
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(claims.__file__).resolve().parents[1])
    code = "import sys, msr.analysis.claims; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}).returncode == 0


def test_rules_state_the_thresholds():
    text = " ".join(claims.RULES)
    for needle in ("0.5 x (1 - chance)", "baseline failed to train", "inconclusive (n = k)", "sign-flip",
                   "Holm", "TOST", "[-m, +m]", "lr factor", "by construction".capitalize()):
        assert needle in text
