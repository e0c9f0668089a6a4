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
# # Figure 7 - every variant against BatchNorm
# Final-epoch test accuracy of every variant of the main grid (sweep tag `base`) on one axis,
# one panel per dataset/arch: a dot per seed that trained, a bar at their mean (value printed),
# and a shaded band across the whole axis: `bn`'s mean +- the half-width of its 95% t confidence
# interval over its trained seeds. The band says where BatchNorm's MEAN may lie given its few
# seeds - it is not a range of equivalence: a variant whose seeds or mean sit inside it is not
# thereby "as good as BatchNorm". Whether a variant reaches BatchNorm is Table 3's question
# (claims 5 and 6: a paired test by seed, with the dataset's margin and Holm's correction).
#
# A run FAILED when it diverged or ended at chance (`msr.analysis.claims.run_outcome`: final
# test accuracy below chance + 0.5 x (1 - chance), the dotted line) - the same definition as
# Table 3 and every figure. A seed that ended at chance is a hollow triangle at its accuracy; a
# seed whose loss became non-finite has no accuracy and is an `x` in the strip at the bottom
# with the count of failed seeds (never a point at 0%). Failed seeds are in no mean.
#
# The accuracy axis is spaced by the logarithm of the error (100 - accuracy): 90 -> 99 takes as
# much room as 0 -> 90, so differences of a point near the top stay visible next to variants
# near chance. A perfect score (error 0, off a log scale) is drawn at the top tick "100", at
# half the smallest non-zero error of the panel.
#
# Snakemake interface: `input.runs` (runs.csv); `output.png`, `output.pdf`,
# `output.provenance`; `params.variants` (the variants to show, e.g. the config's
# `variants`; order and colours come from msr.analysis.figures); optional `params.num_classes`
# (dataset -> classes, for the chance level of a dataset msr.catalog lacks).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator

from msr.analysis import aggregate as agg
from msr.analysis import claims, figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig7_peers", variants=list(figures.VARIANT_ORDER))

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
base = runs[(runs["sweep"] == "base") & runs["variant"].isin(variants)] if not runs.empty else runs
base = figures.with_outcomes(base, num_classes)

# %%
def forward(acc):
    """Accuracy (%) -> -log10(error %); callers move a perfect score to ``100 - floor`` first."""
    return -np.log10(np.clip(100.0 - np.asarray(acc, dtype=float), 1e-9, None))


def inverse(y):
    return 100.0 - 10.0 ** (-np.asarray(y, dtype=float))


TICKS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 93, 95, 97, 98, 99, 99.5, 99.7, 99.8, 99.9, 99.95, 99.98, 99.99]
MIN_TICK_GAP = 0.06  # fraction of the axis height between two tick labels
STRIP = 0.09  # bottom fraction of each axis reserved for diverged seeds (no accuracy)

pairs = figures.panels(base)
nrows = max(1, len(pairs))
# at least 8 inches: a 4-variant set (fashion-5k) cut its title and legend at 6; below 9 the
# title takes two lines and the legend two columns (the 16-variant sets, 9.2 inches, keep one and three)
width = max(8.0, 0.48 * len(variants) + 1.5)
fig, axes = plt.subplots(nrows, 1, figsize=(width, 3.6 * nrows), squeeze=False, layout="constrained")
axes = axes[:, 0]
if not pairs:
    figures.placeholder(axes[0], "no runs of the main grid")
legend = {}
for ax, (dataset, arch) in zip(axes, pairs, strict=False):
    here = base[(base["dataset"] == dataset) & (base["arch"] == arch)]
    shown = [v for v in variants if v in set(here["variant"])]
    chance = 100 * claims.chance_level(dataset, num_classes)
    threshold = 100 * claims.failure_threshold(chance / 100)
    done = here[here["status"] == "completed"]  # every run with an accuracy sets the axis range
    acc = 100 * pd.to_numeric(done["final_test_acc"], errors="coerce")
    errors = (100 - acc)[100 - acc > 1e-9]
    floor = float(min(errors.min() / 2, 0.5)) if not errors.empty else 0.5
    drawn = lambda a, top=100.0 - floor: np.minimum(a, top)  # noqa: E731 - where a score is drawn
    ax.set_yscale("function", functions=(forward, inverse))
    # y range: from below chance (or the worst seed) to above the best seed, plus the strip
    lo = forward(min(chance / 2, acc.min() if not acc.empty else chance) - 1)
    hi = forward(drawn(acc.max())) + 0.25 if not acc.empty else forward(99.9)
    lo -= STRIP / (1 - STRIP) * (hi - lo)
    ax.set_ylim(inverse(lo), inverse(hi))
    # BatchNorm's band across the axis: its mean +- the 95% t CI half-width, over its trained seeds
    trained = here[here["outcome"] == claims.TRAINED]
    bn = 100 * pd.to_numeric(trained.loc[trained["variant"] == "bn", "final_test_acc"], errors="coerce")
    mean, _, ci, n = agg.mean_std_ci(bn)
    if n >= 2:
        ax.axhspan(mean - ci, min(mean + ci, inverse(hi)), color=figures.variant_color("bn"), alpha=0.18, lw=0, zorder=0)
        legend["band"] = Patch(color=figures.variant_color("bn"), alpha=0.3,
                               label=f"bn mean ± 95% CI of that mean (n={n} trained seeds)")
    if n >= 1:
        ax.axhline(drawn(mean), color=figures.variant_color("bn"), lw=0.9, ls="--", zorder=0)
        legend["bn"] = Line2D([], [], color=figures.variant_color("bn"), lw=0.9, ls="--",
                              label="bn mean" + (" (n=1, no CI)" if n == 1 else ""))
    ax.axhline(threshold, color="0.45", lw=0.8, ls=":", zorder=0)
    legend["threshold"] = Line2D([], [], color="0.45", lw=0.8, ls=":",
                                 label="failure threshold: chance + 0.5 x (1 - chance)")
    strip_transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    ax.axhspan(0, 0, lw=0)
    ax.fill_between([-0.5, len(shown) - 0.5], 0, STRIP, transform=strip_transform, color="0.94", lw=0, zorder=0)
    ax.text(-0.45, STRIP / 2, "diverged", transform=strip_transform, fontsize=6, color="0.4", va="center")
    for x, variant in enumerate(shown):
        sel = here[here["variant"] == variant].sort_values("seed")
        color = figures.variant_color(variant)
        acc_all = 100 * pd.to_numeric(sel["final_test_acc"], errors="coerce")
        ok, at_chance = sel["outcome"] == claims.TRAINED, sel["outcome"] == claims.AT_CHANCE
        vals = acc_all[ok].to_numpy()
        low = acc_all[at_chance].to_numpy()
        k = len(vals) + len(low)
        jitter = np.linspace(-0.14, 0.14, k) if k > 1 else np.zeros(k)
        ax.scatter(x + jitter[:len(vals)], drawn(vals), s=16, color=color, edgecolor="white", linewidth=0.4, zorder=3)
        if len(low):
            ax.scatter(x + jitter[len(vals):], drawn(low), s=22, marker="v", facecolor="white", edgecolor=color,
                       linewidth=1.0, zorder=3)
            legend["at_chance"] = Line2D([], [], marker="v", color="0.3", mfc="white", ls="none",
                                         label="seed failed: at chance")
        if len(vals):
            m = float(np.mean(vals))
            ax.plot([x - 0.28, x + 0.28], [drawn(m)] * 2, color="0.15", lw=1.6, zorder=4)
            ax.annotate(f"{m:.1f}", (x + 0.3, drawn(m)), fontsize=6, va="center", color="0.2",
                        xytext=(1, 0), textcoords="offset points")
        n_div, n_failed = int((sel["outcome"] == claims.DIVERGED).sum()), int((~ok).sum())
        if n_div:
            ax.plot([x], [STRIP / 2], marker="x", ms=6, mew=1.5, color=color, transform=strip_transform,
                    ls="none", zorder=3)
            legend["diverged"] = Line2D([], [], marker="x", color="0.3", ls="none", mew=1.5,
                                        label="seed failed: diverged")
        if n_failed:
            ax.text(x + 0.12, STRIP / 2, f"{n_failed}/{len(sel)} failed", transform=strip_transform, fontsize=6,
                    va="center", color="0.2")
    ax.set_xlim(-0.5, len(shown) - 0.5)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown, rotation=40, ha="right")
    # ticks at round accuracies, from the top down, none crowding the one above it; "100" at
    # the floor where a perfect score is drawn
    top = [100.0] if 100 - floor <= inverse(hi) else []
    kept = []
    for t in [*top, *sorted(TICKS, reverse=True)]:
        pos = forward(100 - floor if t == 100 else t)
        if (inverse(lo) <= t <= inverse(hi) and 100 - t > floor) or t == 100:  # none above "100"
            if all(abs(pos - q) >= MIN_TICK_GAP * (hi - lo) for _, q in kept):
                kept.append((t, pos))
    ax.yaxis.set_major_locator(FixedLocator([inverse(q) for _, q in kept]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{t:g}" for t, _ in kept])
    ax.grid(axis="x", visible=False)
    ax.set(ylabel="final test accuracy (%)\n(log-error spacing)",
           title=f"{dataset} / {arch}: final test accuracy per variant"
                 + ("\n" if width < 9 else " ") + "(dots: trained seeds; bar: their mean)")
legend["seed"] = Line2D([], [], marker="o", color="0.5", ls="none", ms=4, label="one seed (trained)")
legend["mean"] = Line2D([], [], color="0.15", lw=1.6, label="mean of the trained seeds")
if pairs:
    order = [k for k in ("seed", "mean", "band", "bn", "threshold", "at_chance", "diverged") if k in legend]
    fig.legend(handles=[legend[k] for k in order], loc="outside lower center",
               ncol=max(1, min(3, len(order), 2 if width < 9 else 3)), frameon=False)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig7_peers", base["run_id"],
                        [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
