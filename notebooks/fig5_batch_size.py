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
# # Figure 5 - batch-size sensitivity
# docs/method.md, claim 5: mean shift rejection needs no minibatch statistics, so - unlike BatchNorm -
# it should not care how small the minibatch is.
#
# Final-epoch test accuracy (mean +- std over completed seeds) and the fraction of diverged
# seeds against the batch size. Points: runs tagged `bs<value>` plus the main grid's runs (at
# `train.batch_size`). The learning rate follows the batch size as set by
# `sweeps.batch_size.lr_scaling` (default linear, relative to `train.batch_size`), so each
# point trains the same number of epochs at a comparable per-sample step. On the accuracy panel
# a hollow marker is a point with one completed seed (no spread to show) and an x at the bottom
# a point where every seed diverged.

# %%
import pandas as pd

from msr.analysis import aggregate as agg
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig5_batch_size", variants=["bn", "msr"], base_batch_size=64,
                                         lr_scaling="linear")

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.select_sweep(runs, variants, "batch_size")
stats = agg.summarize(sel, metrics=["final_test_acc"], by=["dataset", "arch", "variant", "batch_size"])

# %%
fig, rows = figures.sweep_axes(sel, "no batch-size sweep in this config")
for (dataset, arch), (ax_acc, ax_div) in rows:
    here = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch)]
    for variant in variants:
        figures.plot_vs(ax_acc, here, variant, "batch_size", "final_test_acc_mean")
        figures.mark_all_diverged(ax_acc, here, variant, "batch_size")
        figures.plot_vs(ax_div, here, variant, "batch_size", "divergence_rate", errorbars=False, completed_only=False)
    for ax in (ax_acc, ax_div):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch size (lr scaling: {snakemake.params.lr_scaling})")
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", ylabel="test accuracy (%)", ylim=(0, 100))
    ax_div.set(title=f"{dataset} / {arch}: diverged runs", ylabel="diverged (% of seeds)", ylim=(-5, 105))
    figures.fixed_ticks((ax_acc, ax_div), here["batch_size"])
figures.sweep_legend(fig, [acc_ax for _, (acc_ax, _) in rows])
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig5_batch_size", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
