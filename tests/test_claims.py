"""msr.analysis.claims: the verdict rule and its statistics, on made-up runs for every branch."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from msr.analysis import claims
from msr.analysis.claims import CONTRADICTED, INCONCLUSIVE, SUPPORTED, Group

CHANCE = 0.1  # 10 classes: stable means every seed >= 55%


def runs_frame(rows) -> pd.DataFrame:
    """runs.csv-like rows from (variant, tag, lr, [(status, acc), ...]) on digits/resnet20."""
    records = []
    for variant, tag, lr, seeds in rows:
        sweep = "base" if tag == "base" else "lr"
        for seed, (status, acc) in enumerate(seeds):
            records.append({"run_id": f"digits/resnet20/{variant}/{tag}/seed{seed}", "dataset": "digits",
                            "arch": "resnet20", "variant": variant, "tag": tag, "sweep": sweep, "lr": lr,
                            "seed": seed, "status": status,
                            "final_test_acc": acc if status == "completed" else 0.1})
    return pd.DataFrame.from_records(records)


ok = lambda acc: ("completed", acc)  # noqa: E731
DIV = ("diverged", math.nan)


# ------------------------------------------------------------------------------ the rule itself


@pytest.mark.parametrize("low, high, expect, result", [
    (0.1, 0.3, "above", SUPPORTED), (-0.3, -0.1, "above", CONTRADICTED),
    (-0.3, -0.1, "below", SUPPORTED), (0.1, 0.3, "below", CONTRADICTED),
    (-0.1, 0.3, "above", INCONCLUSIVE), (0.0, 0.3, "above", INCONCLUSIVE),  # touching 0 is not above
    (-0.2, 0.0, "below", INCONCLUSIVE), (math.nan, 0.3, "above", INCONCLUSIVE),
])
def test_verdict_rule(low, high, expect, result):
    assert claims.verdict(low, high, expect) == result


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="expect must be"):
        claims.verdict(0.1, 0.2, "higher")


def test_welch_interval_matches_scipy():
    a, b = [0.91, 0.93, 0.95, 0.90], [0.85, 0.80, 0.88]
    ci = claims.welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ci.effect == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high))
    assert ci.method == "Welch t"


def test_welch_interval_of_constant_groups_is_a_point():
    ci = claims.welch_interval([0.9, 0.9], [0.8, 0.8, 0.8])
    assert ci.low == ci.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match=">= 2 values per side"):
        claims.welch_interval([0.9], [0.8, 0.7])


def test_rate_difference_newcombe_published_example():
    # Newcombe (1998), Stat. Med. 17:873, Table II example (b): 56/70 - 48/80, method 10
    ci = claims.rate_difference(56, 70, 48, 80)
    assert ci.effect == pytest.approx(0.2)
    assert (ci.low, ci.high) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    extreme = claims.rate_difference(3, 3, 0, 3)  # all vs none: stays inside [-1, 1]
    assert 0 < extreme.low < extreme.high <= 1


# ------------------------------------------------------------------------ accuracy differences


def test_difference_supported_and_contradicted():
    hi, lo = Group("msr_noise", (0.97, 0.975, 0.972)), Group("bn", (0.95, 0.951, 0.949))
    j = claims.judge_difference("5", hi, lo, "above")
    assert j.verdict == SUPPORTED and j.low > 0 and j.reason == "CI above 0: msr_noise higher than bn"
    assert j.row()["effect"] == pytest.approx(100 * (sum(hi.values) / 3 - sum(lo.values) / 3))
    assert claims.judge_difference("5", lo, hi, "above").verdict == CONTRADICTED
    assert claims.judge_difference("6", lo, hi, "below").verdict == SUPPORTED


def test_identical_groups_are_inconclusive():
    a = Group("msr", (0.9, 0.92, 0.94))
    j = claims.judge_difference("4", a, Group("msr_noise", a.values), "above")
    assert j.verdict == INCONCLUSIVE and j.effect == 0 and j.reason == "CI spans 0"
    constant = claims.judge_difference("4", Group("a", (0.5, 0.5)), Group("b", (0.5, 0.5)), "above")
    assert constant.verdict == INCONCLUSIVE and "no difference" in constant.reason


def test_overlapping_groups_are_inconclusive():
    j = claims.judge_difference("6", Group("wn", (0.90, 0.96, 0.93)), Group("bn", (0.92, 0.95, 0.94)), "below")
    assert j.verdict == INCONCLUSIVE and j.low < 0 < j.high


def test_one_completed_seed_is_inconclusive_and_says_why():
    j = claims.judge_difference("6", Group("fixup", (0.5,), n_diverged=2), Group("bn", (0.95, 0.96)), "below")
    assert j.verdict == INCONCLUSIVE
    assert "fixup: only 1 completed seed (2 diverged), 2 needed" in j.reason
    assert math.isnan(j.effect)
    row = j.row()
    assert (row["n_a"], row["completed_a"], row["diverged_a"]) == (3, 1, 2)
    assert row["seeds"] == "3 (2 div.) / 2"


def test_all_diverged_is_inconclusive_and_says_why():
    j = claims.judge_difference("6", Group("skipinit", (), n_diverged=3), Group("bn", (0.95, 0.96)), "below")
    assert j.verdict == INCONCLUSIVE and j.reason == "skipinit: all 3 seeds diverged"
    both = claims.judge_difference("5", Group("msr_noise"), Group("bn", (), 2), "above")
    assert both.reason == "msr_noise: no runs; bn: all 2 seeds diverged"


def test_divergence_never_makes_a_side_win():
    survivors = Group("msr_noise", (0.99, 0.991), n_diverged=1)
    j = claims.judge_difference("5", survivors, Group("bn", (0.95, 0.951, 0.949)), "above")
    assert j.verdict == INCONCLUSIVE and "favours msr_noise" in j.reason and "1 of its 3" in j.reason
    # the side with diverged seeds loses anyway: the verdict stands, the reason says so
    j = claims.judge_difference("6", Group("wn", (0.80, 0.81), n_diverged=1), Group("bn", (0.95, 0.951)), "below")
    assert j.verdict == SUPPORTED and "wn: 1 of 3 seeds also diverged" in j.reason


def test_group_of_counts_diverged_and_ignores_interrupted():
    frame = pd.DataFrame({"status": ["completed", "diverged", "interrupted", "completed"],
                          "final_test_acc": [0.9, 0.1, 0.5, math.nan]})
    g = claims.group_of(frame, "msr")
    assert g.values == (0.9,) and g.n_diverged == 1 and g.n_runs == 2


# ------------------------------------------------------------------ stability (claims 1 and 2)


def sweep(*points):
    """{lr: Group} from (lr, [(status, acc), ...])."""
    return {lr: Group("v", tuple(a for s, a in seeds if s == "completed"),
                      sum(s == "diverged" for s, _ in seeds)) for lr, seeds in points}


GOOD, BAD, STUCK = [ok(0.95), ok(0.96)], [DIV, DIV], [ok(0.11), ok(0.10)]


def test_stability_needs_every_seed_completed_well_above_chance():
    assert claims.stable_threshold(0.1) == pytest.approx(0.55)
    assert claims.stability(Group("v", (0.95, 0.96)), CHANCE) is True
    assert claims.stability(Group("v", (0.95,), 1), CHANCE) is False  # one seed diverged
    assert claims.stability(Group("v", (0.95, 0.54)), CHANCE) is False  # one seed near chance
    assert claims.stability(Group("v", (0.95,)), CHANCE) is None  # too few seeds to judge


def test_claim1_supported_when_plain_fails_where_bn_trains():
    plain = sweep((0.05, GOOD), (0.1, [ok(0.9), DIV]), (0.4, STUCK))
    bn = sweep((0.05, GOOD), (0.1, GOOD), (0.4, GOOD))
    j = claims.judge_instability(plain, bn, CHANCE)
    assert j.verdict == SUPPORTED and "at lr 0.1, 0.4" in j.reason
    # divergence rates pooled over the sweep: plain 1/6 (the stuck seeds completed), bn 0/6
    assert j.effect == pytest.approx(1 / 6) and j.low < 1 / 6 < j.high
    assert j.a.n_diverged == 1 and j.b.n_runs == 6


def test_claim1_contradicted_when_plain_is_stable_wherever_bn_is():
    plain = sweep((0.05, GOOD), (0.1, GOOD), (0.4, BAD))
    bn = sweep((0.05, GOOD), (0.1, GOOD), (0.4, BAD))
    j = claims.judge_instability(plain, bn, CHANCE)
    assert j.verdict == CONTRADICTED and "stable at every lr where bn is (0.05, 0.1)" in j.reason


def test_claim1_inconclusive_branches():
    bn = sweep((0.1, GOOD))
    assert claims.judge_instability({}, bn, CHANCE).reason == "no learning-rate sweep of plain"
    j = claims.judge_instability(sweep((0.1, BAD)), sweep((0.1, STUCK)), CHANCE)
    assert j.verdict == INCONCLUSIVE and "bn is stable at no lr" in j.reason
    # single-seed points are not judged: nothing left in common
    j = claims.judge_instability(sweep((0.1, [DIV])), sweep((0.1, [ok(0.9)])), CHANCE)
    assert j.verdict == INCONCLUSIVE and "no learning rate with >= 2 seeds" in j.reason


def test_claim2_supported_when_msr_is_stable_at_least_as_high():
    lrs = (0.1, 0.4, 1.6)
    msr = sweep(*[(lr, GOOD) for lr in lrs[:2]], (1.6, BAD))
    bn = sweep((0.1, GOOD), (0.4, GOOD), (1.6, STUCK))
    plain = sweep((0.1, GOOD), (0.4, BAD), (1.6, BAD))
    j = claims.judge_stability(msr, bn, plain, CHANCE)
    assert j.verdict == SUPPORTED
    assert j.detail == "msr 0.4, bn 0.4, plain 0.1 (of lr 0.1, 0.4, 1.6)"
    assert j.seeds_text() == "6 (2 div.) / 6 / 6 (4 div.)"


def test_claim2_contradicted_when_the_ordering_is_reversed():
    msr = sweep((0.1, GOOD), (0.4, BAD))
    bn = sweep((0.1, GOOD), (0.4, GOOD))
    plain = sweep((0.1, BAD), (0.4, BAD))
    j = claims.judge_stability(msr, bn, plain, CHANCE)
    assert j.verdict == CONTRADICTED and "below bn's" in j.reason
    never = claims.judge_stability(sweep((0.1, BAD)), sweep((0.1, BAD)), sweep((0.1, GOOD)), CHANCE)
    assert never.verdict == CONTRADICTED and "below plain's" in never.reason


def test_claim2_inconclusive_branches():
    everything = sweep((0.1, GOOD), (0.4, GOOD))
    tie = claims.judge_stability(everything, everything, everything, CHANCE)
    assert tie.verdict == INCONCLUSIVE and "the top of the sweep" in tie.reason
    nothing = sweep((0.1, BAD))
    assert "no variant is stable" in claims.judge_stability(nothing, nothing, nothing, CHANCE).reason
    missing = claims.judge_stability(everything, {}, {}, CHANCE)
    assert missing.verdict == INCONCLUSIVE and missing.reason == "no learning-rate sweep of bn, plain"


# --------------------------------------------------------------------------------- claim 3


def test_identity_judgement():
    assert claims.judge_identity(0.0, 5.0).verdict == SUPPORTED
    j = claims.judge_identity(0.3, 5.0, control=2.0)
    assert j.verdict == CONTRADICTED and j.detail == "max |difference| 0.3 (bn control: 2)"
    assert claims.judge_identity(math.nan, 5.0).verdict == INCONCLUSIVE


def test_msr_train_and_eval_outputs_are_identical_and_bn_differs():
    diff, scale = claims.train_eval_difference("msr", depth=8, num_classes=10, in_channels=1, image_size=8)
    assert diff == 0.0 and scale > 0
    bn_diff, _ = claims.train_eval_difference("bn", depth=8, num_classes=10, in_channels=1, image_size=8)
    assert bn_diff > 1e-3  # the test can see a difference where there is one


# ----------------------------------------------------------------------------- the whole table


def test_claims_table_rows_per_claim_and_peer():
    good3 = [ok(0.95), ok(0.96), ok(0.955)]
    runs = runs_frame([
        ("bn", "base", 0.1, good3), ("msr", "base", 0.4, [ok(0.93), ok(0.94), ok(0.935)]),
        ("nf", "base", 0.4, [ok(0.6), ok(0.7), ok(0.65)]), ("msr_noise", "base", 0.4, [ok(0.90), DIV, DIV]),
        ("wn", "base", 0.1, [ok(0.80), ok(0.81), ok(0.82)]), ("fixup", "base", 0.1, [DIV, DIV, DIV]),
        ("plain", "base", 0.1, [DIV, DIV, DIV]),
        ("bn", "lr0.4", 0.4, GOOD), ("plain", "lr0.4", 0.4, BAD), ("msr", "lr0.1", 0.1, GOOD),
        ("plain", "lr0.05", 0.05, GOOD), ("bn", "lr0.05", 0.05, GOOD), ("msr", "lr0.05", 0.05, GOOD),
    ])
    identity = {("digits", "resnet20"): {"diff": 0.0, "scale": 3.0, "control": 1.5}}
    table = claims.claims_table(runs, identity=identity)
    assert list(table["claim"]) == ["1", "2", "2", "3", "4", "4", "5", "6", "6", "6"]
    # a second, shallower arch: its rows come first (by depth), judged on its own runs only
    shallow = runs.assign(arch="resnet8")
    both = claims.claims_table(pd.concat([runs, shallow[shallow["variant"] != "wn"]]),
                               identity={**identity, ("digits", "resnet8"): identity[("digits", "resnet20")]})
    assert list(both["arch"]) == ["resnet8"] * 10 + ["resnet20"] * 10
    assert both.iloc[7]["reason"] == "wn not in the runs" and both.iloc[17]["verdict"] == SUPPORTED
    by = {(r.claim, r.comparison.split(":")[0]): r for r in table.itertuples()}
    assert table.iloc[0]["verdict"] == SUPPORTED  # plain fails at 0.1 and 0.4 where bn trains
    assert table.iloc[1]["verdict"] == SUPPORTED and "msr 0.4, bn 0.4, plain 0.05" in table.iloc[1]["detail"]
    assert by[("2", "msr - nf")].verdict == SUPPORTED
    assert table.iloc[3]["verdict"] == SUPPORTED
    assert by[("4", "msr_noise - msr")].reason == "msr_noise: only 1 completed seed (2 diverged), 2 needed"
    assert by[("4", "bn_noise - bn")].reason == "bn_noise not in the runs"
    assert by[("6", "wn - bn")].verdict == SUPPORTED
    assert by[("6", "fixup - bn")].reason == "fixup: all 3 seeds diverged"
    assert by[("6", "skipinit - bn")].verdict == INCONCLUSIVE
    assert set(table["dataset"]) == {"digits"} and table["reason"].str.len().min() > 0
    # a dataset without any lr sweep: claims 1 and 2 say so
    flat = claims.claims_table(runs[runs["sweep"] == "base"], identity=identity)
    assert flat.iloc[0]["reason"] == "no learning-rate sweep of plain, bn"
    assert flat.iloc[1]["reason"] == "no learning-rate sweep of msr, bn, plain"


def test_mean_shift_row_from_step0_probes():
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
    assert row["unit"] == "ratio" and row["verdict"] == SUPPORTED
    assert (row["n_a"], row["diverged_a"]) == (2, 0)  # plain diverged later, but its init counts


def test_chance_level_names_an_unknown_dataset():
    assert claims.chance_level("cifar100") == pytest.approx(0.01)
    assert claims.chance_level("mnist", {"mnist": 10}) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'mnist' unknown"):
        claims.chance_level("mnist")


# ------------------------------------------- msr.analysis.figures markers the figures use to show divergence


def test_sweep_markers_show_single_seeds_and_all_diverged_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from msr.analysis import figures

    stats = pd.DataFrame({"variant": ["msr"] * 3, "lr": [0.1, 0.4, 1.6], "n_completed": [2, 1, 0],
                          "n_diverged": [0, 1, 2], "final_test_acc_mean": [0.9, 0.8, math.nan],
                          "final_test_acc_std": [0.01, math.nan, math.nan]})
    fig, (ax, other) = plt.subplots(1, 2)
    figures.plot_vs(ax, stats, "msr", "lr", "final_test_acc_mean")
    hollow = [line for line in ax.lines if line.get_gid() == "msr-key-single-seed"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.4] and hollow[0].get_markerfacecolor() == "white"
    crosses = figures.mark_all_diverged(ax, stats, "msr", "lr")
    assert list(crosses["lr"]) == [1.6]
    figures.sweep_legend(fig, [ax, other])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "msr", "1 completed seed (no spread)", "every seed diverged"]
    # nothing special drawn: no keys for it in the legend
    fig2, ax2 = plt.subplots()
    figures.plot_vs(ax2, stats.iloc[:1], "msr", "lr", "final_test_acc_mean")
    assert figures.mark_all_diverged(ax2, stats.iloc[:1], "msr", "lr").empty
    figures.sweep_legend(fig2, [ax2])
    assert [t.get_text() for t in fig2.legends[0].get_texts()] == ["msr"]
    plt.close("all")
