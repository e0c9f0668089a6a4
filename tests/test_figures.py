"""msr.analysis.figures: what the figure and table notebooks count, draw and write - the one
failure definition (claims.run_outcome) applied to runs, test-set runs only, figure 1's claim
panels, axis ranges, dead layers, the sweep markers and legend, and T3's readable columns."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from msr import catalog
from msr.analysis import claims, figures

matplotlib.use("Agg")


def runs(rows) -> pd.DataFrame:
    """runs.csv-like rows from (variant, sweep, x, seed, status, final test acc)."""
    return pd.DataFrame([{"run_id": f"digits/resnet20/{v}/{sweep}{x}/seed{s}", "dataset": "digits",
                          "arch": "resnet20", "variant": v, "sweep": sweep, "lr": x, "seed": s,
                          "status": status, "final_test_acc": acc}
                         for v, sweep, x, s, status, acc in rows])


# ------------------------------------------------------------------ runs and their outcomes


def test_only_test_set_sweeps_reach_a_figure():
    frame = runs([("bn", "base", 0.1, 0, "completed", 0.9), ("bn", "lr", 0.2, 0, "completed", 0.9),
                  ("bn", "lr_select", 0.1, 0, "completed", 0.9), ("bn", "batch_size", 0.1, 0, "completed", 0.9)])
    assert sorted(figures.test_runs(frame)["sweep"]) == ["base", "batch_size", "lr"]
    assert figures.test_runs(frame.iloc[0:0]).empty


def test_outcomes_are_claims_run_outcome_for_every_run():
    frame = runs([("plain", "base", 0.1, 0, "diverged", math.nan), ("plain", "base", 0.1, 1, "completed", 0.549),
                  ("plain", "base", 0.1, 2, "completed", 0.55), ("plain", "base", 0.1, 3, "completed", 0.99)])
    out = figures.with_outcomes(frame)
    assert list(out["outcome"]) == [claims.run_outcome(s, a, 0.1) for s, a in
                                    zip(frame["status"], frame["final_test_acc"], strict=True)]
    assert list(out["outcome"]) == [claims.DIVERGED, claims.AT_CHANCE, claims.TRAINED, claims.TRAINED]
    assert list(out["failed"]) == [True, True, False, False]
    assert out["threshold"].tolist() == pytest.approx([0.55] * 4)
    # a dataset the catalog lacks needs its classes; with 2 classes the threshold is 75%
    other = frame.assign(dataset="coins")
    with pytest.raises(ValueError, match="coins"):
        figures.with_outcomes(other)
    assert list(figures.with_outcomes(other, {"coins": 2})["outcome"])[1:] == [claims.AT_CHANCE] * 2 + [claims.TRAINED]
    # an interrupted run is no result: an error, never a silent drop
    with pytest.raises(ValueError, match="neither"):
        figures.with_outcomes(frame.assign(status="running"))


def test_summary_counts_failures_and_averages_only_trained_runs():
    frame = figures.with_outcomes(runs([
        ("bn", "lr", 0.1, 0, "completed", 0.90), ("bn", "lr", 0.1, 1, "completed", 0.80),
        ("bn", "lr", 0.1, 2, "completed", 0.20), ("bn", "lr", 0.1, 3, "diverged", math.nan),
        ("bn", "lr", 0.4, 0, "diverged", math.nan), ("bn", "lr", 0.4, 1, "completed", 0.3)]))
    stats = figures.summarize_outcomes(frame, ["lr"]).set_index("lr")
    a, b = stats.loc[0.1], stats.loc[0.4]
    assert (a["n"], a["n_trained"], a["n_failed"], a["n_diverged"], a["n_at_chance"]) == (4, 2, 2, 1, 1)
    assert a["failure_rate"] == 0.5
    assert a["final_test_acc_mean"] == pytest.approx(0.85) and a["final_test_acc_n"] == 2
    assert a["final_test_acc_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert (a["final_test_acc_min"], a["final_test_acc_max"]) == (0.8, 0.9)
    assert b["n_trained"] == 0 and b["failure_rate"] == 1.0 and math.isnan(b["final_test_acc_mean"])


def test_outcome_words():
    assert figures.outcome_text(3, 3, 0, 0) == "3/3 trained"
    assert figures.outcome_text(3, 1, 1, 1) == "1/3 trained, 2 failed (1 diverged, 1 at chance)"
    assert figures.failures_text(0, 2) == "2 failed (2 at chance)" and figures.failures_text(0, 0) == ""
    assert figures.count_range([2, 3, 2]) == "2-3" and figures.count_range([2, 2]) == "2"
    assert "diverged or at chance" in figures.FAILED


# ---------------------------------------------------------------------------------- axes


def test_padded_range_shows_every_value_spans_the_minimum_and_stays_below_100():
    lo, hi = figures.padded_range([96.5, 97.0, 98.2], min_span=10, upper=100)
    assert hi == 100 and hi - lo >= 10 and lo < 96.5
    lo, hi = figures.padded_range([40, 99], min_span=10, upper=100)  # a wide spread is all shown
    assert lo < 40 and hi == 100
    lo, hi = figures.padded_range([0.5, 1.2], min_span=5, include=[0.0])  # the gap's zero in view
    assert lo < 0 < 1.2 < hi and hi - lo >= 5
    assert figures.padded_range([math.nan], min_span=10) == (0.0, 100.0)


def test_failure_strip_lies_below_the_data_and_is_named():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    y = figures.failure_strip(ax, 0, 100)
    bottom, top = ax.get_ylim()
    assert bottom < y < 0 and top == 100
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "diverged" and all(float(t) >= 0 for t in labels[:-1])
    plt.close(fig)


# ----------------------------------------------------------------------- figure 1's panels


def test_curve_facets_group_by_claim_with_the_reference_and_six_lines_at_most():
    facets = figures.curve_facets(catalog.VARIANTS)
    titles = [t for t, _ in facets]
    assert titles[:3] == [t for t, _ in figures.CURVE_GROUPS]
    for _, members in facets:
        assert members[0] == "bn" and len(members) <= 6 and len(set(members)) == len(members)
    shown = {v for _, members in facets for v in members}
    assert shown == set(catalog.VARIANTS)
    by_title = dict(facets)
    assert {"plain", "nf", "zmi", "zmg", "msr"} <= set(by_title["claims 1-2: the ablations"])
    assert set(by_title["claims 4-5: noise"]) == {"bn", "bn_noise", "msr", "msr_noise"}  # with msr, the twin
    assert set(by_title["claim 6: batch-free peers"]) == {"bn", "wn", "fixup", "skipinit"}


def test_curve_facets_split_a_large_group_and_place_unknown_variants():
    facets = figures.curve_facets(["bn", "zz_new", *catalog.VARIANTS], max_per_panel=3)
    assert all(len(m) <= 3 and m[0] == "bn" for _, m in facets)
    assert any(t.startswith("claims 1-2: the ablations (1/") for t, _ in facets)
    assert "zz_new" in {v for t, m in facets if t.startswith("other variants") for v in m}
    # no reference in the config: no reference line, nothing lost
    facets = figures.curve_facets(["plain", "msr"])
    assert facets == [("claims 1-2: the ablations", ["plain", "msr"])]


# ----------------------------------------------------------------------- figure 2's dead layers


def test_dead_layers_are_exact_zeros_and_leave_the_mean():
    assert list(figures.is_dead([0.0, 1e-9, 0.3, math.nan])) == [True, False, False, False]
    probes = pd.DataFrame({"depth_index": [0, 0, 1, 1, 2, 2], "step": [5] * 6,
                           "value": [0.2, 0.4, 0.0, 0.3, 0.0, 0.0]})
    means = figures.layer_means(probes, ["depth_index"]).set_index("depth_index")
    assert means.loc[0, "value"] == pytest.approx(0.3) and means.loc[0, "n_dead"] == 0
    assert means.loc[1, "value"] == pytest.approx(0.3) and means.loc[1, "n_dead"] == 1  # alive seed only
    assert math.isnan(means.loc[2, "value"]) and means.loc[2, "n_dead"] == 2  # no point on a log axis
    assert list(means["n_seeds"]) == [2, 2, 2]


# --------------------------------------------------------------------------- sweep figures


def test_sweep_draws_every_seed_by_outcome_and_the_legend_names_every_variant():
    import matplotlib.pyplot as plt

    frame = figures.with_outcomes(runs([
        ("msr", "lr", 0.1, 0, "completed", 0.95), ("msr", "lr", 0.1, 1, "completed", 0.97),
        ("msr", "lr", 0.4, 0, "completed", 0.96), ("msr", "lr", 0.4, 1, "completed", 0.30),
        ("msr", "lr", 1.6, 0, "diverged", math.nan), ("msr", "lr", 1.6, 1, "diverged", math.nan),
        ("plain", "lr", 0.1, 0, "diverged", math.nan), ("plain", "lr", 0.4, 0, "completed", 0.12)]))
    fig, ax = plt.subplots()
    strip = figures.failure_strip(ax, 0, 100)
    stats = figures.plot_sweep(ax, frame, "msr", "lr", strip_y=strip)
    figures.plot_sweep(ax, frame, "plain", "lr", strip_y=strip)
    by_gid = {}
    for line in ax.lines:
        by_gid.setdefault(line.get_gid(), []).append(line)
    mean = by_gid["msr-key-mean"][0]
    assert list(mean.get_xdata()) == [0.1, 0.4, 1.6]
    y = np.asarray(mean.get_ydata(), dtype=float)
    assert y[0] == pytest.approx(96) and y[1] == pytest.approx(96) and math.isnan(y[2])  # 30%: at chance, no mean
    single = by_gid["msr-key-single"][0]  # one trained seed at 0.4: no spread to show
    assert list(single.get_xdata()) == [0.4] and single.get_markerfacecolor() == "white"
    at_chance = [(x, y) for line in by_gid["msr-key-at-chance"] for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    assert sorted(at_chance) == [(0.4, pytest.approx(12)), (0.4, pytest.approx(30))]
    diverged = [(x, y) for line in by_gid["msr-key-diverged"] for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    assert sorted(diverged) == [(0.1, strip), (1.6, strip), (1.6, strip)]
    assert list(stats["failure_rate"]) == [0.0, 0.5, 1.0]
    # plain failed at every point: no mean line, but a legend entry all the same
    plain_mean = [line for line in by_gid["msr-key-mean"] if line.get_color() == figures.variant_color("plain")]
    assert np.isnan(np.asarray(plain_mean[0].get_ydata(), dtype=float)).all()
    figures.sweep_legend(fig, {"msr": "msr (n = 2)", "plain": "plain (n = 1)"}, [ax])
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["msr (n = 2)", "plain (n = 1)"]
    assert {"seed failed: at chance", "seed failed: diverged", "1 trained seed (no spread)",
            "mean of the seeds that trained, bars: ± 1 std"} <= set(texts)
    plt.close(fig)
    # nothing special drawn: no keys for it
    fig, ax = plt.subplots()
    figures.plot_sweep(ax, frame[frame["lr"] == 0.1], "msr", "lr")
    figures.sweep_legend(fig, {"msr": "msr"}, [ax])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "msr", "mean of the seeds that trained, bars: ± 1 std", "one seed (trained)"]
    plt.close(fig)


def test_lr_axis_is_the_factor_when_every_run_has_one():
    frame = runs([("bn", "base", 0.1, 0, "completed", 0.9), ("bn", "lr", 0.05, 0, "completed", 0.9),
                  ("msr", "base", 0.4, 0, "completed", 0.9), ("msr", "lr", 0.2, 0, "completed", 0.9)])
    x, label = figures.lr_axis(frame)
    assert list(x) == [0.1, 0.05, 0.4, 0.2] and "learning rate" in label
    x, label = figures.lr_axis(frame.assign(lr_factor=[math.nan, 0.5, math.nan, 0.5]))
    assert list(x) == [1.0, 0.5, 1.0, 0.5] and label.startswith("lr factor")
    # a sweep run without a factor: the absolute lr, as Table 3 does
    x, _ = figures.lr_axis(frame.assign(lr_factor=[math.nan, 0.5, math.nan, math.nan]))
    assert list(x) == [0.1, 0.05, 0.4, 0.2]


def test_standalone_notebooks_read_the_sets_tables(monkeypatch):
    monkeypatch.delenv("MSR_SET", raising=False)
    sm = figures.standalone_snakemake("fig1_curves", variants=["bn"])
    assert sm.input.runs == "results/digits/tables/runs.csv" and sm.output.png.startswith("results/digits/scratch/")
    monkeypatch.setenv("MSR_SET", "fashion-cpu")
    sm = figures.standalone_snakemake("tab3_claims", kind="table")
    assert sm.input.curves == "results/fashion-cpu/tables/curves.csv" and sm.output.tex.endswith("tab3_claims.tex")


# ------------------------------------------------------------------------------ Table 3


def t3_frame() -> pd.DataFrame:
    """A made-up T3 (claims.COLUMNS) with a supported paired row, an inconclusive unpaired row,
    a sweep row, a failed-baseline row and a by-construction row."""
    base = {c: None for c in claims.COLUMNS} | {"dataset": "fashion_mnist", "arch": "resnet20"}
    rows = [
        base | dict(claim="5", comparison="msr_noise - bn", a="msr_noise", n_a=5, trained_a=5, diverged_a=0,
                    at_chance_a=0, b="bn", n_b=5, trained_b=4, diverged_b=0, at_chance_b=1, pairing="paired",
                    shares_init=False, n_test=4, effect=1.234, ci_low=0.61, ci_high=1.86, ci_method="paired t",
                    unit="pp", margin=0.5, p=0.004, p_holm=0.012, holm_m=1, verdict=claims.SUPPORTED,
                    reason="CI above 0: msr_noise higher than bn", detail="", seeds="5 / 5 (1 at chance)"),
        base | dict(claim="4", comparison="msr_noise - msr", a="msr_noise", n_a=3, trained_a=3, diverged_a=0,
                    at_chance_a=0, b="msr", n_b=4, trained_b=3, diverged_b=1, at_chance_b=0, pairing="unpaired",
                    shares_init=False, n_test=3, effect=0.2, ci_low=-0.9, ci_high=1.3, ci_method="Welch t",
                    unit="pp", margin=0.5, p=0.61, p_holm=0.61, holm_m=2, verdict=claims.INCONCLUSIVE,
                    reason="CI spans 0", detail="unpaired: the sides' seeds differ", seeds=""),
        base | dict(claim="2", comparison="lr sweep: highest stable lr factor", unit="lr",
                    a="msr", n_a=13, trained_a=11, diverged_a=2, at_chance_a=0, b="bn", n_b=13, trained_b=7,
                    diverged_b=0, at_chance_b=6, verdict=claims.SUPPORTED, reason="msr's highest stable point ...",
                    detail="msr highest 8, range 0.125-8 (6 oct.)",
                    seeds="msr 13 (2 div.) / bn 13 (6 at chance) / plain 13 (12 div., 1 at chance)"),
        base | dict(claim="6", comparison="wn - bn", a="wn", n_a=3, trained_a=0, diverged_a=3, at_chance_a=0,
                    b="bn", n_b=3, trained_b=3, diverged_b=0, at_chance_b=0, unit="pp", margin=0.5,
                    verdict=claims.BASELINE_FAILED, reason="wn: 3 of 3 runs under 55% final clean train accuracy"),
        base | dict(claim="3", comparison="msr: no layer depends on train/eval mode", unit="abs", effect=0.0,
                    ci_low=0.0, ci_high=0.0, verdict=claims.BY_CONSTRUCTION, reason="msr has no batch statistics",
                    detail="measured max |train - eval| 0"),
        base | dict(claim="4", comparison="msr_noise - msr", a="msr_noise", n_a=0, trained_a=0, diverged_a=0,
                    at_chance_a=0, b="msr", n_b=3, trained_b=3, diverged_b=0, at_chance_b=0, unit="pp", margin=0.5,
                    verdict=claims.inconclusive_n(0), reason="msr_noise not in the runs"),
    ]
    frame = pd.DataFrame(rows, columns=claims.COLUMNS)
    return frame.astype({**{c: "Int64" for c in claims.COUNT_COLUMNS},
                         **{c: "boolean" for c in ("shares_init", "ci_clipped")}})


def test_t3_markdown_shows_runs_pairing_effect_margin_holm_p_and_verdicts():
    md = figures.claims_markdown(t3_frame())
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    assert header == list(figures.CLAIMS_COLUMNS)
    cell = [dict(zip(header, r, strict=True)) for r in body]
    assert cell[0]["runs: trained / all (failed)"] == "msr_noise 5/5; bn 4/5 (1 at chance)"
    assert cell[0]["pairing"] == "paired, n = 4"
    assert cell[0]["effect [95% CI]"] == "+1.23 pp [+0.61, +1.86]"
    assert cell[0]["margin"] == "±0.5 pp" and cell[0]["p (Holm)"] == "0.012 (of 1)"
    assert cell[0]["verdict"] == "supported" and cell[0]["dataset / arch"] == "fashion_mnist / resnet20"
    assert cell[1]["pairing"] == "unpaired, n = 3: the sides' seeds differ" and cell[1]["p (Holm)"] == "0.61 (of 2)"
    assert cell[1]["runs: trained / all (failed)"] == "msr_noise 3/3; msr 3/4 (1 div.)"
    assert cell[1]["verdict"] == "inconclusive" and "unpaired" not in cell[1]["effect [95% CI]"]
    assert cell[2]["runs: trained / all (failed)"] == ("msr 11/13 (2 div.); bn 7/13 (6 at chance); "
                                                       "plain 0/13 (12 div., 1 at chance)")
    assert cell[2]["effect [95% CI]"].startswith("msr highest 8") and cell[2]["p (Holm)"] == "-"
    assert cell[3]["verdict"] == "baseline failed to train" and cell[3]["runs: trained / all (failed)"] == \
        "wn 0/3 (3 div.); bn 3/3"
    assert cell[5]["runs: trained / all (failed)"] == "msr_noise: no runs; msr 3/3"
    assert cell[5]["verdict"] == "inconclusive (n = 0)" and cell[5]["p (Holm)"] == "-"
    assert cell[4]["verdict"] == "by construction" and cell[4]["effect [95% CI]"] == "measured max \\|train - eval\\| 0"
    notes = md.split("\n\n")[-1]
    assert "never means 'equal'" in notes and "Holm" in notes and all(rule in notes for rule in claims.RULES)


def test_t3_latex_has_the_same_cells_escaped():
    tex = figures.claims_latex(t3_frame())
    assert r"\label{tab:claims}" in tex and r"\toprule" in tex and r"\scriptsize" in tex
    assert r"$\pm$0.5 pp" in tex and "0.012 (of 1)" in tex
    for word in ("supported", "inconclusive", "baseline failed to train", "by construction"):
        assert word in tex
    assert r"msr\_noise - bn" in tex and r"fashion\_mnist / resnet20" in tex
    assert "p{3.2cm}" in tex  # the reason column wraps


# ------------------------------------------------------------------------------ figure 7


@pytest.mark.parametrize("variants", [["bn", "bn_noise", "msr", "msr_noise"], list(catalog.VARIANTS)])
def test_fig7_title_and_legend_fit_inside_the_figure(tmp_path, variants):
    """A 4-variant set (fashion-5k) once cut fig7's title and legend at the figure's edges: every
    text the reader needs lies inside the saved canvas, for a small set and for every variant."""
    import runpy
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    frame = pd.DataFrame([{"run_id": f"fashion_mnist/resnet20/{v}/base/seed{s}", "dataset": "fashion_mnist",
                           "arch": "resnet20", "variant": v, "sweep": "base", "seed": s, "status": "completed",
                           "final_test_acc": 0.88 + 0.01 * rng.random()}
                          for v in variants for s in range(3)])
    frame.to_csv(tmp_path / "runs.csv", index=False)
    out = tmp_path / "fig7"
    sm = SimpleNamespace(input=SimpleNamespace(runs=str(tmp_path / "runs.csv")),
                         output=SimpleNamespace(png=f"{out}.png", pdf=f"{out}.pdf", provenance=f"{out}.json"),
                         params=SimpleNamespace(variants=variants))
    done = runpy.run_path(str(Path(__file__).resolve().parents[1] / "notebooks/fig7_peers.py"), init_globals={"snakemake": sm})
    fig = done["fig"]
    renderer = fig.canvas.get_renderer()
    texts = [ax.title for ax in fig.axes] + [t for legend in fig.legends for t in legend.get_texts()]
    texts += [legend.legend_handles[0] for legend in fig.legends if legend.legend_handles]
    assert len(texts) > 3
    width, height = fig.bbox.width, fig.bbox.height
    for artist in texts:
        box = artist.get_window_extent(renderer)
        label = getattr(artist, "get_text", lambda: artist)()
        assert box.x0 >= -0.5 and box.x1 <= width + 0.5 and box.y0 >= -0.5 and box.y1 <= height + 0.5, (label, box, width)


def test_fig2_failure_titles_do_not_run_into_each_other(tmp_path):
    """fashion-cpu's fig2 once printed `plain`'s and `zmi`'s failure titles on one line each, and
    the two ran into each other ("...at step 33/3 failed..."): every panel title stays inside its
    own column and inside the canvas."""
    import runpy
    from types import SimpleNamespace

    layers = ["stem"] + [f"blocks.{b}.conv{c}" for b in range(9) for c in (1, 2)]
    rng = np.random.default_rng(0)
    rows = []
    # variant, seed, status, final test acc, diverged at step
    plan = [("bn", s, "completed", 0.84, None) for s in range(3)]
    plan += [("plain", s, "diverged", math.nan, 3) for s in range(3)]
    plan += [("zmi", 0, "diverged", math.nan, 26), ("zmi", 1, "completed", 0.10, None), ("zmi", 2, "completed", 0.10, None)]
    plan += [("msr", s, "completed", 0.83, None) for s in range(3)]
    for variant, seed, status, acc, step in plan:
        run_dir = tmp_path / "runs" / "fashion_mnist" / "resnet20" / variant / "base" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        steps = [0] if status == "diverged" and step < 10 else list(range(0, 500, 50))
        pd.DataFrame([{"step": t, "layer": name, "metric": "mean_shift", "value": float(rng.uniform(0.01, 1.0))}
                      for t in steps for name in layers]).to_csv(run_dir / "probes.csv", index=False)
        rows.append({"run_id": f"fashion_mnist/resnet20/{variant}/base/seed{seed}", "run_dir": str(run_dir),
                     "dataset": "fashion_mnist", "arch": "resnet20", "variant": variant, "sweep": "base",
                     "seed": seed, "status": status, "final_test_acc": acc, "diverged_at_step": step})
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    out = tmp_path / "fig2"
    sm = SimpleNamespace(input=SimpleNamespace(runs=str(tmp_path / "runs.csv")),
                         output=SimpleNamespace(png=f"{out}.png", pdf=f"{out}.pdf", provenance=f"{out}.json"),
                         params=SimpleNamespace(variants=["bn", "plain", "zmi", "msr"], dataset="fashion_mnist",
                                                arch="resnet20", num_classes={}))
    done = runpy.run_path(str(Path(__file__).resolve().parents[1] / "notebooks/fig2_mean_shift.py"),
                          init_globals={"snakemake": sm})
    fig = done["fig"]
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_title()]
    # titles in the panels' left-to-right order
    titles = [(ax.get_title(), ax.title.get_window_extent(renderer))
              for ax in sorted(panels, key=lambda ax: ax.get_window_extent(renderer).x0)]
    assert any("failed" in t and "at chance" in t for t, _ in titles), titles
    for (name, box), (next_name, next_box) in zip(titles, titles[1:]):
        assert box.x1 < next_box.x0, f"{name!r} runs into {next_name!r}"
    for name, box in titles:
        assert box.x0 >= -0.5 and box.x1 <= fig.bbox.width + 0.5, name
