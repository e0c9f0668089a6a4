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
# # Figure 1 - training curves
# Test accuracy and test loss per epoch for every variant of the main grid (sweep tag `base`).
# Line: mean over the seeds that completed; band: their range (min to max). A diverged run is
# drawn on its own (dotted, ending in x at its last finite epoch) and left out of the mean.
#
# Inputs: `results/tables/runs.csv`, `results/tables/curves.csv` (from `msr aggregate`).

# %%
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig1_curves", variants=list(figures.VARIANT_ORDER))

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
curves = pd.read_csv(snakemake.input.curves)
variants = figures.ordered_variants(snakemake.params.variants)
base = runs[(runs["sweep"] == "base") & runs["variant"].isin(variants)] if not runs.empty else runs
curves = curves[curves["run_id"].isin(base["run_id"])] if not base.empty else curves.iloc[0:0]

# %%
pairs = figures.panels(base)
marker = "o" if curves.empty or curves["epoch"].max() <= 30 else None  # short runs: show the points
nrows = max(1, len(pairs))
fig, axes = plt.subplots(nrows, 2, figsize=(9.5, 3.0 * nrows), squeeze=False, layout="constrained")
if not pairs:
    for ax in axes[0]:
        figures.placeholder(ax, "no runs of the main grid")
for row, (dataset, arch) in enumerate(pairs):
    ax_acc, ax_loss = axes[row]
    for variant in variants:
        sel = base[(base["dataset"] == dataset) & (base["arch"] == arch) & (base["variant"] == variant)]
        if sel.empty:
            continue
        color = figures.variant_color(variant)
        done = curves[curves["run_id"].isin(sel.loc[sel["status"] == "completed", "run_id"])]
        n_div = int((sel["status"] == "diverged").sum())
        label = variant + (f" ({n_div}/{len(sel)} diverged)" if n_div else "")
        if not done.empty:
            stats = done.groupby("epoch").agg(
                acc_mean=("test_acc", "mean"), acc_min=("test_acc", "min"), acc_max=("test_acc", "max"),
                loss_mean=("test_loss", "mean"), loss_min=("test_loss", "min"), loss_max=("test_loss", "max"),
            ).reset_index()
            ax_acc.plot(stats["epoch"], 100 * stats["acc_mean"], color=color, lw=1.4, marker=marker, ms=3, label=label)
            ax_acc.fill_between(stats["epoch"], 100 * stats["acc_min"], 100 * stats["acc_max"], color=color, alpha=0.15, lw=0)
            ax_loss.plot(stats["epoch"], stats["loss_mean"], color=color, lw=1.4, marker=marker, ms=3, label=label)
            ax_loss.fill_between(stats["epoch"], stats["loss_min"], stats["loss_max"], color=color, alpha=0.15, lw=0)
        else:
            ax_acc.plot([], [], color=color, lw=1.4, marker=marker, ms=3, label=label)
        for rid in sel.loc[sel["status"] == "diverged", "run_id"]:
            c = curves[curves["run_id"] == rid].sort_values("epoch")
            if c.empty:
                continue
            ax_acc.plot(c["epoch"], 100 * c["test_acc"], color=color, lw=0.8, ls=":")
            ax_acc.plot(c["epoch"].iloc[-1:], 100 * c["test_acc"].iloc[-1:], color=color, marker="x", ls="none")
            ax_loss.plot(c["epoch"], c["test_loss"], color=color, lw=0.8, ls=":")
    ax_acc.set(title=f"{dataset} / {arch}: test accuracy", xlabel="epoch", ylabel="test accuracy (%)")
    ax_loss.set(title=f"{dataset} / {arch}: test loss", xlabel="epoch", ylabel="test loss", yscale="log")
    ax_acc.set_ylim(0, 100)
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
handles, labels = axes[0][0].get_legend_handles_labels()
if handles:
    fig.legend(handles, labels, loc="outside right center", frameon=False)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig1_curves", base["run_id"],
                     [snakemake.output.png, snakemake.output.pdf],
                     [snakemake.input.runs, snakemake.input.curves])
