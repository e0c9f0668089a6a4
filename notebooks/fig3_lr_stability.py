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
# # Figure 3 - learning-rate stability
# docs/method.md, claim 1 (and 2): without normalization, deep nets are unstable at high learning
# rate; mean shift rejection makes them trainable where `plain` diverges.
#
# For each variant of the lr sweep: left, final-epoch test accuracy (mean +- std over the seeds
# that completed); right, the fraction of seeds whose loss became non-finite. The sweep's
# points come from runs tagged `lr<value>` plus the main grid's run at the variant's default
# learning rate. The x axis is the base (conv-group) learning rate; the other parameter group
# keeps its ratio to it. On the accuracy panel a hollow marker is a point with one completed
# seed (no spread to show) and an x at the bottom a point where every seed diverged (it has no
# accuracy, but must not vanish from the panel).

# %%
import pandas as pd

from msr.analysis import aggregate as agg
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig3_lr_stability", variants=["plain", "bn", "msr"])

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.select_sweep(runs, variants, "lr")
stats = agg.summarize(sel, metrics=["final_test_acc"], by=["dataset", "arch", "variant", "lr"])

# %%
fig, rows = figures.sweep_axes(sel, "no learning-rate sweep in this config")
for (dataset, arch), (ax_acc, ax_div) in rows:
    here = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch)]
    for variant in variants:
        figures.plot_vs(ax_acc, here, variant, "lr", "final_test_acc_mean")
        figures.mark_all_diverged(ax_acc, here, variant, "lr")
        figures.plot_vs(ax_div, here, variant, "lr", "divergence_rate", errorbars=False, completed_only=False)
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel="learning rate", xscale="log",
               ylabel="test accuracy (%)", ylim=(0, 100))
    ax_div.set(title=f"{dataset} / {arch}: diverged runs", xlabel="learning rate", xscale="log",
               ylabel="diverged (% of seeds)", ylim=(-5, 105))
    figures.fixed_ticks((ax_acc, ax_div), here["lr"])
figures.sweep_legend(fig, [acc_ax for _, (acc_ax, _) in rows])
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig3_lr_stability", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
