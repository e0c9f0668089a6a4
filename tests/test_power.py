"""msr.analysis.power and `msr targets`: a study's power and regime targets from its runs.csv."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from msr.analysis import power
from msr.cli import main


def test_mdd_is_the_paired_t_formula_and_shrinks_with_sqrt_n():
    d = [0.2, -0.4, 0.9, 0.1, -0.3, 0.5]
    n = len(d)
    expected = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * np.std(d, ddof=1) / math.sqrt(n)
    assert power.paired_mdd(d) == pytest.approx(expected)
    # four times the pairs with the same spread: about half the MDD (and less, as t shrinks)
    assert power.paired_mdd(d * 4) < power.paired_mdd(d) / 2
    assert math.isnan(power.paired_mdd([0.3]))


def test_an_exact_effect_at_the_mdd_is_found_80_percent_of_the_time():
    # the definition checked by simulation: true effect = the MDD of sd 1, n 12 -> power ~0.8
    rng = np.random.default_rng(0)
    n, sd = 12, 1.0
    mdd = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    hits = [stats.ttest_1samp(rng.normal(mdd, sd, n), 0).pvalue < 0.05 for _ in range(4000)]
    assert 0.76 < np.mean(hits) < 0.84


def runs_table() -> pd.DataFrame:
    rows = []
    acc = {"msr": [0.880, 0.884, 0.878, 0.882], "msr_noise": [0.885, 0.886, 0.880, 0.887]}
    for variant, values in acc.items():
        for seed, a in enumerate(values):
            rows.append(dict(dataset="fashion_mnist", arch="resnet20", variant=variant, sweep="base", seed=seed,
                             status="completed", final_test_acc=a, final_clean_train_acc=a + 0.05))
    # a diverged msr seed 4 and its partner: left out of the pairs; a sweep run: not the main grid
    rows.append(dict(dataset="fashion_mnist", arch="resnet20", variant="msr", sweep="base", seed=4,
                     status="diverged", final_test_acc=float("nan"), final_clean_train_acc=float("nan")))
    rows.append(dict(dataset="fashion_mnist", arch="resnet20", variant="msr_noise", sweep="base", seed=4,
                     status="completed", final_test_acc=0.5, final_clean_train_acc=0.5))
    rows.append(dict(dataset="fashion_mnist", arch="resnet20", variant="msr", sweep="lr", seed=0,
                     status="completed", final_test_acc=0.1, final_clean_train_acc=0.1))
    return pd.DataFrame(rows)


def test_power_rows_pair_trained_main_grid_seeds():
    [row] = power.power_rows(runs_table(), [("msr_noise", "msr")], mdd_max=0.75).to_dict("records")
    d = np.array([0.5, 0.2, 0.2, 0.5])
    assert row["pairs"] == 4 and row["mean_pp"] == pytest.approx(d.mean())
    assert row["sd_pp"] == pytest.approx(d.std(ddof=1))
    assert row["mdd_pp"] == pytest.approx(power.paired_mdd(d)) and row["met"] == (row["mdd_pp"] <= 0.75)


def test_gap_rows_average_trained_seeds():
    rows = power.gap_rows(runs_table(), ["msr", "msr_noise"], gap_min=4.0).set_index("variant")
    assert rows.loc["msr", "seeds"] == 4 and rows.loc["msr", "gap_pp"] == pytest.approx(5.0)
    assert rows.loc["msr", "met"] and rows.loc["msr_noise", "seeds"] == 4  # its at-chance seed 4 left out
    assert not power.gap_rows(runs_table(), ["msr"], gap_min=6.0).loc[0, "met"]


def test_msr_targets_prints_both_tables_and_names_bad_input(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    runs_table().to_csv(path, index=False)
    assert main(["targets", str(path), "--pair", "msr_noise:msr", "--gap", "msr"]) == 0
    out = capsys.readouterr().out
    assert "msr_noise - msr" in out and "mdd_pp" in out and "gap_pp" in out
    assert main(["targets", str(path), "--pair", "msr_noise"]) != 0
    assert "give two variants as A:B" in capsys.readouterr().err
    assert main(["targets", str(path), "--gap", "bn"]) != 0
    assert "no runs of bn" in capsys.readouterr().err
    assert main(["targets", str(tmp_path / "none.csv"), "--gap", "msr"]) != 0
