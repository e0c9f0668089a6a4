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
# rate; mean shift rejection makes them trainable where `plain` fails.
#
# For each variant of the lr sweep, left: final-epoch test accuracy - every seed (a small dot; a
# hollow triangle for a seed that ended at chance; an x in the grey strip for one that
# diverged: it has no accuracy) and a line through the mean of the seeds that TRAINED, bars
# +-1 std over them (a hollow circle: one trained seed, no spread); the dotted line is the
# failure threshold. Right: the share of seeds that failed (diverged or at chance) - ONE
# definition, `msr.analysis.claims.run_outcome`, the same as Table 3's. Every variant has a
# legend entry with its seeds per point, also one whose every point failed.
#
# The x axis is the lr factor of each variant's own default (every param group scaled together)
# when runs.csv has `lr_factor`; otherwise the absolute base (conv-group) lr, the other
# parameter groups keeping their ratio to it. Points: the lr sweep's runs plus the main grid's
# run at the variant's default (factor 1). Variants at the same point are shifted sideways a
# little so their markers do not hide each other.
#
# Snakemake interface: `input.runs`; `output.png`, `output.pdf`, `output.provenance`;
# `params.variants` (the lr sweep's variants); optional `params.num_classes`.

# %%
import pandas as pd

from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig3_lr_stability", variants=["plain", "bn", "msr"])

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
sel = figures.with_outcomes(figures.select_sweep(runs, variants, "lr"), num_classes)
x_values, x_label = figures.lr_axis(sel)
sel = sel.assign(x=x_values)

# %%
fig, rows = figures.sweep_axes(sel, "no learning-rate sweep in this config", width=9.5)
shown = [v for v in variants if v in set(sel["variant"])]
seeds_per_point = {}
for (dataset, arch), (ax_acc, ax_fail) in rows:
    here = sel[(sel["dataset"] == dataset) & (sel["arch"] == arch)]
    strip = figures.failure_strip(ax_acc, 0, 100)
    figures.plot_threshold(ax_acc, float(here["threshold"].iloc[0]))
    for i, variant in enumerate(shown):
        offset = figures.dodge(i, len(shown))
        stats = figures.plot_sweep(ax_acc, here, variant, "x", strip_y=strip, offset=offset)
        figures.plot_failure_rate(ax_fail, stats, variant, "x", offset=offset)
        seeds_per_point.setdefault(variant, []).extend(stats["n"].tolist())
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel=x_label, xscale="log",
               ylabel="test accuracy (%)")
    ax_fail.set(title=f"{dataset} / {arch}: failed runs (diverged or at chance)", xlabel=x_label,
                xscale="log", ylabel="failed (% of seeds)", ylim=(-5, 105))
    figures.fixed_ticks((ax_acc, ax_fail), here["x"])
entries = {v: f"{v} (n = {figures.count_range(seeds_per_point[v])} seeds per point)" for v in shown}
figures.sweep_legend(fig, entries, [acc_ax for _, (acc_ax, _) in rows], ncol=3)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig3_lr_stability", sel["run_id"],
                         [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
