# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: language_info
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Figure 6 - noise magnitude
# docs/method.md, claim 4: multiplicative noise injected throughout the network while training
# ("deep data augmentation", what BatchNorm's minibatch noise does implicitly) improves
# generalization.
#
# Left: final-epoch test accuracy against the noise magnitude d (multiplier ~ U(1-d, 1+d) per
# sample and channel at every block input; d = 0 is noise off). Right: the generalization gap,
# clean train accuracy minus test accuracy at the final epoch, in points. Both panels show EVERY
# seed (a small dot) and a line through the mean of the seeds that TRAINED, bars +-1 std over
# them (a hollow circle: one trained seed, no spread); the number of seeds of each point is
# written under it. A failed seed (`msr.analysis.claims.run_outcome`: diverged, or ended at
# chance) is a hollow triangle at its accuracy or an x in the grey strip, never in a mean.
#
# The y axes are not cut to the means: each spans at least 10 points of accuracy (5 of gap,
# with 0 in view) and every seed, so a difference smaller than the seed-to-seed scatter is not
# drawn as a trend. Read the differences against the scatter of the seeds at one point, and
# Table 3 (claim 4) for the test.
#
# Clean train accuracy (`final_clean_train_acc`; `clean_train_test_gap` in runs.csv) is measured
# like the test accuracy - eval mode, no augmentation, no noise - on a fixed subset of the
# training set (the first min(N, 1000) training images, msr.training.loop). The running train
# accuracy logged during an epoch is not used: it averages augmented, noisy batches while the
# weights move, so it is not comparable with test accuracy (it made the gap negative). Runs
# recorded before the clean accuracy existed have no gap: the panel says so instead of falling
# back to the running one.
#
# Snakemake interface: `input.runs`; `output.png`, `output.pdf`, `output.provenance`;
# `params.variants` (the noise sweep's variants); optional `params.num_classes`.

# %%
import pandas as pd

from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig6_noise", variants=["msr_noise"])

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.with_outcomes(figures.select_sweep(runs, variants, "noise_delta"), num_classes)
GAP = "clean_train_test_gap"  # msr.analysis.aggregate: final_clean_train_acc - final_test_acc
has_gap = GAP in sel.columns and pd.to_numeric(sel[GAP], errors="coerce").notna().any()
MIN_SPAN_ACC, MIN_SPAN_GAP = 10.0, 5.0  # points: the least each y axis spans

# %%
fig, rows = figures.sweep_axes(sel, "no noise sweep in this config", width=9.5)
shown = [v for v in variants if v in set(sel["variant"])]
seeds_per_point = {}
for (dataset, arch), (ax_acc, ax_gap) in rows:
    here = sel[(sel["dataset"] == dataset) & (sel["arch"] == arch)]
    completed = here[here["status"] == "completed"]
    lo, hi = figures.padded_range(100 * pd.to_numeric(completed["final_test_acc"], errors="coerce"),
                                  min_span=MIN_SPAN_ACC, upper=100.0, lower=0.0)
    strip = None
    if (here["outcome"] == "diverged").any():
        strip = figures.failure_strip(ax_acc, lo, hi)
    else:
        ax_acc.set_ylim(lo, hi)
    if (here["threshold"] * 100 >= lo).any():
        figures.plot_threshold(ax_acc, float(here["threshold"].iloc[0]))
    for i, variant in enumerate(shown):
        offset = 1.0 + 0.004 * (i - (len(shown) - 1) / 2) if len(shown) > 1 else 1.0
        stats = figures.plot_sweep(ax_acc, here, variant, "noise_delta", strip_y=strip, offset=offset)
        seeds_per_point.setdefault(variant, []).extend(stats["n"].tolist())
        if len(shown) == 1:
            figures.annotate_n(ax_acc, stats, "noise_delta", y=(figures.STRIP if strip is not None else 0) + 0.01)
        if has_gap:
            gap = here[here["outcome"] == "trained"]
            figures.plot_sweep(ax_gap, gap, variant, "noise_delta", GAP, offset=offset, failed_seeds=False)
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel="noise magnitude d", ylabel="test accuracy (%)")
    figures.fixed_ticks((ax_acc, ax_gap), here["noise_delta"])
    if has_gap:
        trained = here[here["outcome"] == "trained"]
        ax_gap.set_ylim(*figures.padded_range(100 * pd.to_numeric(trained[GAP], errors="coerce"),
                                              min_span=MIN_SPAN_GAP, include=[0.0]))
        ax_gap.axhline(0, color="0.6", lw=0.8)
        ax_gap.set(title=f"{dataset} / {arch}: clean train - test gap (seeds that trained)",
                   xlabel="noise magnitude d", ylabel="gap (points)")
    else:
        figures.placeholder(ax_gap, "no clean train accuracy in these runs\n(made before msr train recorded it: rerun them)")
entries = {v: f"{v} (n = {figures.count_range(seeds_per_point[v])} seeds per point)" for v in shown}
figures.sweep_legend(fig, entries, [ax for _, pair in rows for ax in pair], ncol=3)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig6_noise", sel["run_id"],
                         [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
