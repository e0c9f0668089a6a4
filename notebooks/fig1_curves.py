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
# Test accuracy (top) and test loss (bottom, log scale) per epoch for every variant of the main
# grid (sweep tag `base`), one column per claim group (`msr.analysis.figures.curve_facets`: the
# claims 1-2 ablations, the claims 4-5 noise variants with their noise-free twins, the claim 6
# batch-free peers, the other variants), `bn` in every column as the reference - at most six
# colours a panel. Each column's legend (under it) gives every variant's seeds: `n` when all
# trained, else how many trained and how many failed.
#
# Seeds that trained and seeds that failed are two different outcomes, so they are drawn apart
# (the rule for a group that splits): the seeds that TRAINED are a line at their mean with a band
# from their min to their max; every seed that FAILED - diverged (non-finite loss) or ended at
# chance (final test accuracy below chance + 0.5 x (1 - chance)), `msr.analysis.claims.run_outcome`,
# the definition Table 3 and every figure use - is its own thin line: dashed when it ended at
# chance, dotted and ending in an x at its last finite epoch when it diverged. A failed seed is
# in no mean.
#
# Snakemake interface: `input.runs`, `input.curves` (from `msr aggregate`); `output.png`,
# `output.pdf`, `output.provenance`; `params.variants`; optional `params.num_classes`.

# %%
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from msr.analysis import claims, figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig1_curves", variants=list(figures.VARIANT_ORDER))

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
curves = pd.read_csv(snakemake.input.curves)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
base = runs[(runs["sweep"] == "base") & runs["variant"].isin(variants)] if not runs.empty else runs
base = figures.with_outcomes(base, num_classes)
curves = curves[curves["run_id"].isin(base["run_id"])] if not base.empty else curves.iloc[0:0]
# epochs a run did not evaluate (train.eval_every) hold NaN: the curves join the evaluated ones
curves = curves[curves["test_acc"].notna()]

# %%
pairs = figures.panels(base)
facets = figures.curve_facets([v for v in variants if v in set(base["variant"])]) if pairs else []
marker = "o" if curves.empty or curves["epoch"].nunique() <= 30 else None  # few evaluations: show them
ncols, nrows = max(1, len(facets)), 2 * max(1, len(pairs))
fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 3.3 * ncols), 3.2 * nrows), squeeze=False,
                         layout="constrained")
epochs = sorted(curves["epoch"].unique())
if not pairs:
    for ax in axes.ravel():
        figures.placeholder(ax, "no runs of the main grid")
FAILED_STYLE = {claims.AT_CHANCE: dict(ls="--", lw=0.8), claims.DIVERGED: dict(ls=":", lw=1.0)}
for row, (dataset, arch) in enumerate(pairs):
    here = base[(base["dataset"] == dataset) & (base["arch"] == arch)]
    for col, (title, members) in enumerate(facets):
        ax_acc, ax_loss = axes[2 * row][col], axes[2 * row + 1][col]
        handles, labels = [], []
        for variant in members:
            sel = here[here["variant"] == variant]
            if sel.empty:
                continue
            color = figures.variant_color(variant)
            counts = figures.outcome_counts(sel["outcome"])
            trained = curves[curves["run_id"].isin(sel.loc[sel["outcome"] == claims.TRAINED, "run_id"])]
            if not trained.empty:
                stats = trained.groupby("epoch").agg(
                    acc_mean=("test_acc", "mean"), acc_min=("test_acc", "min"), acc_max=("test_acc", "max"),
                    loss_mean=("test_loss", "mean"), loss_min=("test_loss", "min"), loss_max=("test_loss", "max"),
                ).reset_index()
                ax_acc.plot(stats["epoch"], 100 * stats["acc_mean"], color=color, lw=1.4, marker=marker, ms=2.5)
                ax_acc.fill_between(stats["epoch"], 100 * stats["acc_min"], 100 * stats["acc_max"], color=color,
                                    alpha=0.15, lw=0)
                ax_loss.plot(stats["epoch"], stats["loss_mean"], color=color, lw=1.4, marker=marker, ms=2.5)
                ax_loss.fill_between(stats["epoch"], stats["loss_min"], stats["loss_max"], color=color, alpha=0.15, lw=0)
            for rid, outcome in zip(sel["run_id"], sel["outcome"], strict=True):
                if outcome == claims.TRAINED:
                    continue
                c = curves[curves["run_id"] == rid].sort_values("epoch")
                if c.empty:
                    continue
                ax_acc.plot(c["epoch"], 100 * c["test_acc"], color=color, marker=marker, ms=2.5, mfc="white",
                            **FAILED_STYLE[outcome])
                ax_loss.plot(c["epoch"], c["test_loss"], color=color, marker=marker, ms=2.5, mfc="white",
                             **FAILED_STYLE[outcome])
                if outcome == claims.DIVERGED:
                    ax_acc.plot(c["epoch"].iloc[-1:], 100 * c["test_acc"].iloc[-1:], color=color, marker="x", ls="none")
            handles.append(Line2D([], [], color=color, lw=1.4))
            unseen = int((~sel["run_id"].isin(curves["run_id"])).sum())  # runs with no finished epoch
            labels.append((f"{variant} (n={counts['n']})" if not counts["n_failed"] else
                           f"{variant}: " + figures.outcome_text(counts["n"], counts["n_trained"], counts["n_diverged"],
                                                                 counts["n_at_chance"]))
                          + (f"\n  ({unseen} with no finished epoch)" if unseen else ""))
        ax_acc.set(title=f"{dataset} / {arch}\n{title}", ylabel="test accuracy (%)" if col == 0 else None,
                   ylim=(0, 100))
        ax_loss.set(xlabel="epoch", ylabel="test loss" if col == 0 else None, yscale="log")
        for ax in (ax_acc, ax_loss):  # epochs are whole numbers
            if len(epochs) <= 15:
                ax.set_xticks(epochs)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if handles:
            ax_loss.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
                           fontsize=7, handlelength=1.5)
if pairs:
    keys = [(Line2D([], [], color="0.3", lw=1.4), "mean of the seeds that trained (band: min to max)"),
            (Line2D([], [], color="0.3", **FAILED_STYLE[claims.AT_CHANCE]), "one seed that failed: at chance"),
            (Line2D([], [], color="0.3", marker="x", **FAILED_STYLE[claims.DIVERGED]),
             "one seed that failed: diverged (x: its last finite epoch)")]
    fig.legend([h for h, _ in keys], [t for _, t in keys], loc="outside lower center", ncol=3 if ncols >= 3 else 1,
               frameon=False)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig1_curves", base["run_id"],
                         [snakemake.output.png, snakemake.output.pdf],
                         [snakemake.input.runs, snakemake.input.curves])
