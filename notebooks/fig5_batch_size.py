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
# METHOD.md claim 5: mean shift rejection needs no minibatch statistics, so - unlike BatchNorm -
# it should not care how small the minibatch is.
#
# Final-epoch test accuracy (mean +- std over completed seeds) and the fraction of diverged
# seeds against the batch size. Points: runs tagged `bs<value>` plus the main grid's runs (at
# `train.batch_size`). The learning rate follows the batch size as set by
# `sweeps.batch_size.lr_scaling` (default linear, relative to `train.batch_size`), so each
# point trains the same number of epochs at a comparable per-sample step.

# %%
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import FixedLocator, NullLocator

from msr import aggregate as agg
from msr import report

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = report.standalone_snakemake("fig5_batch_size", variants=["bn", "msr"], base_batch_size=64,
                                         lr_scaling="linear")

report.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = report.ordered_variants(snakemake.params.variants)
sel = runs[runs["sweep"].isin(["base", "batch_size"]) & runs["variant"].isin(variants)] if not runs.empty else runs
swept = sel[sel["sweep"] == "batch_size"][["dataset", "arch"]].drop_duplicates()
sel = sel.merge(swept, on=["dataset", "arch"]) if not sel.empty else sel
stats = agg.summarize(sel, metrics=["final_test_acc"], by=["dataset", "arch", "variant", "batch_size"])

# %%
pairs = report.panels(sel)
nrows = max(1, len(pairs))
fig, axes = plt.subplots(nrows, 2, figsize=(9, 3.0 * nrows), squeeze=False, layout="constrained")
if not pairs:
    for ax in axes[0]:
        report.placeholder(ax, "no batch-size sweep in this config")
for row, (dataset, arch) in enumerate(pairs):
    ax_acc, ax_div = axes[row]
    for variant in variants:
        s = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch) & (stats["variant"] == variant)]
        if s.empty:
            continue
        s = s.sort_values("batch_size")
        color = report.variant_color(variant)
        ok = s[s["n_completed"] > 0]
        ax_acc.errorbar(ok["batch_size"], 100 * ok["final_test_acc_mean"], yerr=100 * ok["final_test_acc_std"].fillna(0),
                        color=color, marker="o", ms=4, lw=1.2, capsize=2, label=variant)
        ax_div.plot(s["batch_size"], 100 * s["divergence_rate"], color=color, marker="o", ms=4, lw=1.2, label=variant)
    for ax in (ax_acc, ax_div):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch size (lr scaling: {snakemake.params.lr_scaling})")
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", ylabel="test accuracy (%)", ylim=(0, 100))
    ax_div.set(title=f"{dataset} / {arch}: diverged runs", ylabel="diverged (% of seeds)", ylim=(-5, 105))
    ticks = sorted(sel.loc[(sel["dataset"] == dataset) & (sel["arch"] == arch), "batch_size"].unique())
    for ax in (ax_acc, ax_div):
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax_acc.legend(frameon=False)
report.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
report.write_provenance(snakemake.output.provenance, "fig5_batch_size", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
