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
# METHOD.md claim 1 (and 2): without normalization, deep nets are unstable at high learning
# rate; mean shift rejection makes them trainable where `plain` diverges.
#
# For each variant of the lr sweep: left, final-epoch test accuracy (mean +- std over the seeds
# that completed); right, the fraction of seeds whose loss became non-finite. The sweep's
# points come from runs tagged `lr<value>` plus the main grid's run at the variant's default
# learning rate. The x axis is the base (conv-group) learning rate; the other parameter group
# keeps its ratio to it.

# %%
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import FixedLocator, NullLocator

from msr import aggregate as agg
from msr import report

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = report.standalone_snakemake("fig3_lr_stability", variants=["plain", "bn", "msr"])

report.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = report.ordered_variants(snakemake.params.variants)
sel = runs[runs["sweep"].isin(["base", "lr"]) & runs["variant"].isin(variants)] if not runs.empty else runs
# a panel only where the sweep ran (a main-grid run alone is not a sweep)
swept = sel[sel["sweep"] == "lr"][["dataset", "arch"]].drop_duplicates()
sel = sel.merge(swept, on=["dataset", "arch"]) if not sel.empty else sel
stats = agg.summarize(sel, metrics=["final_test_acc"], by=["dataset", "arch", "variant", "lr"])

# %%
pairs = report.panels(sel)
nrows = max(1, len(pairs))
fig, axes = plt.subplots(nrows, 2, figsize=(9, 3.0 * nrows), squeeze=False, layout="constrained")
if not pairs:
    for ax in axes[0]:
        report.placeholder(ax, "no learning-rate sweep in this config")
for row, (dataset, arch) in enumerate(pairs):
    ax_acc, ax_div = axes[row]
    for variant in variants:
        s = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch) & (stats["variant"] == variant)]
        if s.empty:
            continue
        s = s.sort_values("lr")
        color = report.variant_color(variant)
        ok = s[s["n_completed"] > 0]
        ax_acc.errorbar(ok["lr"], 100 * ok["final_test_acc_mean"], yerr=100 * ok["final_test_acc_std"].fillna(0),
                        color=color, marker="o", ms=4, lw=1.2, capsize=2, label=variant)
        ax_div.plot(s["lr"], 100 * s["divergence_rate"], color=color, marker="o", ms=4, lw=1.2, label=variant)
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel="learning rate", xscale="log",
               ylabel="test accuracy (%)", ylim=(0, 100))
    ax_div.set(title=f"{dataset} / {arch}: diverged runs", xlabel="learning rate", xscale="log",
               ylabel="diverged (% of seeds)", ylim=(-5, 105))
    ticks = sorted(sel.loc[(sel["dataset"] == dataset) & (sel["arch"] == arch), "lr"].unique())
    for ax in (ax_acc, ax_div):
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax_acc.legend(frameon=False)
report.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
report.write_provenance(snakemake.output.provenance, "fig3_lr_stability", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
