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
# Left: final-epoch test accuracy (mean +- std over completed seeds) against the noise
# magnitude d (multiplier ~ U(1-d, 1+d) per sample and channel at every block input; d = 0 is
# noise off). Right: the generalization gap, clean train accuracy minus test accuracy at the
# final epoch, in points (mean +- std over completed seeds). Clean train accuracy
# (`final_clean_train_acc`; `clean_train_test_gap` in runs.csv) is measured like the test
# accuracy - eval mode, no augmentation, no noise - on a fixed subset of the training set (the
# first min(N, 1000) training images, msr.training.loop). The running train accuracy logged during an
# epoch is not used: it averages augmented, noisy batches while the weights move, so it is not
# comparable with test accuracy (it made the gap negative). Runs recorded before the clean
# accuracy existed have no gap: the panel says so instead of falling back to the running one.
# A hollow marker is a point with a single completed seed (no error bar can be drawn).
#
# Snakemake interface: `input.runs`; `output.png`, `output.pdf`, `output.provenance`;
# `params.variants` (the noise sweep's variants).

# %%
import pandas as pd

from msr.analysis import aggregate as agg
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig6_noise", variants=["msr_noise"])

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.select_sweep(runs, variants, "noise_delta")
GAP = "clean_train_test_gap"  # msr.analysis.aggregate: final_clean_train_acc - final_test_acc
has_gap = GAP in sel.columns and pd.to_numeric(sel[GAP], errors="coerce").notna().any()
stats = agg.summarize(sel, metrics=["final_test_acc", *([GAP] if has_gap else [])],
                      by=["dataset", "arch", "variant", "noise_delta"])

# %%
fig, rows = figures.sweep_axes(sel, "no noise sweep in this config")
for (dataset, arch), (ax_acc, ax_gap) in rows:
    here = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch)]
    for variant in variants:
        s = figures.plot_vs(ax_acc, here, variant, "noise_delta", "final_test_acc_mean")
        if has_gap:
            figures.plot_vs(ax_gap, here, variant, "noise_delta", f"{GAP}_mean")
        for _, r in s[s["n_diverged"] > 0].iterrows():
            ax_acc.annotate(f"{int(r['n_diverged'])} diverged", (r["noise_delta"], 100 * r["final_test_acc_mean"]),
                            fontsize=6, color=figures.variant_color(variant), xytext=(3, -8), textcoords="offset points")
        figures.mark_all_diverged(ax_acc, here, variant, "noise_delta")
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel="noise magnitude d", ylabel="test accuracy (%)")
    figures.fixed_ticks((ax_acc, ax_gap), here["noise_delta"])
    if has_gap:
        ax_gap.axhline(0, color="0.6", lw=0.8)
        ax_gap.set(title=f"{dataset} / {arch}: clean train - test gap", xlabel="noise magnitude d",
                   ylabel="gap (points)")
    else:
        figures.placeholder(ax_gap, "no clean train accuracy in these runs\n(made before msr train recorded it: rerun them)")
figures.sweep_legend(fig, [acc_ax for _, (acc_ax, _) in rows])
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig6_noise", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
