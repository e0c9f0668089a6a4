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
# Left: final-epoch test accuracy against the batch size - every seed (a small dot; a hollow
# triangle for a seed that ended at chance; an x in the grey strip for one that diverged) and
# a line through the mean of the seeds that TRAINED, bars +-1 std over them (a hollow circle:
# one trained seed, no spread); the dotted line is the failure threshold. Right: the share of
# seeds that failed (diverged or at chance; `msr.analysis.claims.run_outcome`, Table 3's
# definition). Points: runs tagged `bs<value>` plus the main grid's runs (at
# `train.batch_size`). The learning rate follows the batch size as set by
# `sweeps.batch_size.lr_scaling` (default linear, relative to `train.batch_size`), so each
# point trains the same number of epochs at a comparable per-sample step.
#
# Snakemake interface: `input.runs`; `output.png`, `output.pdf`, `output.provenance`;
# `params.variants`, `params.lr_scaling`; optional `params.num_classes`.

# %%
import pandas as pd

from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig5_batch_size", variants=["bn", "msr"], base_batch_size=64,
                                             lr_scaling="linear")

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.with_outcomes(figures.select_sweep(runs, variants, "batch_size"), num_classes)

# %%
fig, rows = figures.sweep_axes(sel, "no batch-size sweep in this config", width=9.5)
shown = [v for v in variants if v in set(sel["variant"])]
seeds_per_point = {}
for (dataset, arch), (ax_acc, ax_fail) in rows:
    here = sel[(sel["dataset"] == dataset) & (sel["arch"] == arch)]
    strip = figures.failure_strip(ax_acc, 0, 100)
    figures.plot_threshold(ax_acc, float(here["threshold"].iloc[0]))
    for i, variant in enumerate(shown):
        offset = figures.dodge(i, len(shown))
        stats = figures.plot_sweep(ax_acc, here, variant, "batch_size", strip_y=strip, offset=offset)
        figures.plot_failure_rate(ax_fail, stats, variant, "batch_size", offset=offset)
        seeds_per_point.setdefault(variant, []).extend(stats["n"].tolist())
    for ax in (ax_acc, ax_fail):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"batch size (lr scaling: {snakemake.params.lr_scaling})")
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", ylabel="test accuracy (%)")
    ax_fail.set(title=f"{dataset} / {arch}: failed runs (diverged or at chance)", ylabel="failed (% of seeds)",
                ylim=(-5, 105))
    figures.fixed_ticks((ax_acc, ax_fail), here["batch_size"])
entries = {v: f"{v} (n = {figures.count_range(seeds_per_point[v])} seeds per point)" for v in shown}
figures.sweep_legend(fig, entries, [acc_ax for _, (acc_ax, _) in rows], ncol=3)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig5_batch_size", sel["run_id"],
                         [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
