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
# # Figure 2 - mean shift through depth and training
# docs/method.md, claim 1: without normalization a *spatial common-mode signal* - the per-channel
# mean of conv outputs, relative to their spread - grows through depth; BatchNorm removes it
# and zero-mean kernels (ZMI, kept by ZMG in `msr`) reject it.
#
# Mean shift of a conv layer = mean over channels of |mean_{n,h,w} y_c| / std_{n,h,w} y_c on a
# fixed probe batch of training images (msr.training.probes). One panel per variant: one line per conv
# layer (colour = depth), mean over seeds. Last panel: the depth profile at initialization
# (dashed) and at the last probed step (solid). For `bn` the probe sees the conv output
# *before* BatchNorm, which then removes the mean - its curve shows what BN has to undo.
#
# A DEAD layer - mean shift exactly 0 because its output is exactly 0 (`figures.is_dead`) - is not
# a layer without mean shift and has no place on a log axis: it is marked by a triangle at the
# bottom of the panel (in the layer's colour; in the variant's colour on the depth profile, hollow
# at initialization) at every step where it is dead in at least one seed, and the line averages
# the seeds where the layer is alive (it breaks where the layer is dead in every seed). A panel
# title counts the variant's failed runs (diverged or at chance, `msr.analysis.claims.run_outcome`):
# a diverged run's probes stop at its last finite step.
#
# Runs: the main grid (`base`) of one dataset and arch (config `analysis.probe_dataset`/`probe_arch`).

# %%
import matplotlib.pyplot as plt
import pandas as pd

from msr.analysis import aggregate as agg
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig2_mean_shift", variants=["plain", "bn", "zmi", "msr"],
                                         dataset="digits", arch="resnet20")

figures.figure_style()
runs = pd.read_csv(snakemake.input.runs)
dataset, arch = snakemake.params.dataset, snakemake.params.arch
variants = figures.ordered_variants(snakemake.params.variants)
sel = runs[(runs["sweep"] == "base") & (runs["dataset"] == dataset) & (runs["arch"] == arch)
           & runs["variant"].isin(variants)] if not runs.empty else runs
sel = figures.with_outcomes(sel, dict(getattr(snakemake.params, "num_classes", None) or {}))
probes = agg.load_probes(sel["run_dir"], metrics=["mean_shift"]) if not sel.empty else None
if probes is not None and not probes.empty:
    probes = probes.merge(sel[["run_id", "variant", "seed"]], on="run_id")
    layer_order = list(dict.fromkeys(probes["layer"]))  # forward order, as recorded
    layer_index = {name: i for i, name in enumerate(layer_order)}
    probes["depth_index"] = probes["layer"].map(layer_index)

# %%
ncols = len(variants) + 1
fig, axes = plt.subplots(1, ncols, figsize=(2.6 * ncols, 3.0), squeeze=False, layout="constrained")
axes = axes[0]
cmap = plt.get_cmap("viridis")
profile_ax = axes[-1]
for ax in axes[1:-1]:
    ax.sharey(axes[0])  # one scale for every variant
DEAD_Y = 0.03  # axes fraction where dead layers are marked (they have no place on a log axis)
any_dead = False
for ax, variant in zip(axes[:-1], variants, strict=True):
    vruns = sel[sel["variant"] == variant]
    if probes is None or probes.empty or vruns.empty:
        figures.placeholder(ax, f"{variant}: no runs")
        ax.set_title(variant)
        continue
    p = probes[probes["variant"] == variant]
    mean = figures.layer_means(p, ["depth_index", "step"])
    n_layers = max(1, len(layer_order) - 1)
    marker = "o" if mean["step"].nunique() < 3 else None  # e.g. a run that diverged at once
    dead_layers = set()
    for idx, g in mean.groupby("depth_index"):
        ax.plot(g["step"], g["value"], color=cmap(idx / n_layers), lw=0.9, marker=marker, ms=3)
        dead = g[g["n_dead"] > 0]
        if not dead.empty:
            dead_layers.add(idx)
            ax.plot(dead["step"], [DEAD_Y] * len(dead), transform=ax.get_xaxis_transform(), ls="none", marker="v",
                    ms=4, color=cmap(idx / n_layers), clip_on=False, zorder=4)
    if dead_layers:
        any_dead = True
        ax.text(0.98, DEAD_Y + 0.05, f"{len(dead_layers)} dead layer{'s' * (len(dead_layers) > 1)} (output = 0)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=6, color="0.3")
    counts = figures.outcome_counts(vruns["outcome"])
    title = variant
    if counts["n_failed"]:
        steps = pd.to_numeric(vruns.loc[vruns["outcome"] == "diverged", "diverged_at_step"], errors="coerce").dropna()
        where = f" at step {int(steps.min())}" + (f"-{int(steps.max())}" if steps.max() > steps.min() else "") \
            if not steps.empty else ""
        parts = [f"{k} {w}" for k, w in ((counts["n_diverged"], f"diverged{where}"), (counts["n_at_chance"], "at chance")) if k]
        # one line per kind of failure: a panel is ~2.6 in wide, and two neighbours' one-line
        # titles ran into each other
        title += f"\n{counts['n_failed']}/{counts['n']} failed:" + "".join(f"\n{part}" for part in parts)
    ax.set(title=title, xlabel="step", yscale="log")
    # depth profile: initialization and the last step every seed of this variant reached
    last = p.groupby("run_id")["step"].max().min()
    for step, ls in ((0, "--"), (last, "-")) if last > 0 else ((0, "--"),):
        prof = figures.layer_means(p[p["step"] == step], ["depth_index"])
        if prof.empty:
            continue
        color = figures.variant_color(variant)
        profile_ax.plot(prof["depth_index"], prof["value"], ls=ls, color=color, lw=1.2)
        dead = prof[prof["n_dead"] > 0]
        if not dead.empty:
            any_dead = True
            profile_ax.plot(dead["depth_index"], [DEAD_Y] * len(dead), transform=profile_ax.get_xaxis_transform(),
                            ls="none", marker="v", ms=4, color=color, mfc=color if ls == "-" else "white",
                            clip_on=False, zorder=4)
axes[0].set_ylabel("mean shift |mean| / std")
if probes is not None and not probes.empty:
    profile_ax.set(title="depth profile", xlabel="conv layer (forward order)", yscale="log")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=figures.variant_color(v), lw=1.2, label=v) for v in variants
               if v in set(probes["variant"])]
    handles += [Line2D([], [], color="0.3", ls="--", label="initialization"),
                Line2D([], [], color="0.3", ls="-", label="last step")]
    if any_dead:
        handles.append(Line2D([], [], color="0.3", ls="none", marker="v", ms=4, label="dead layer (output = 0)"))
    profile_ax.legend(handles=handles, fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, len(layer_order) - 1)))
    fig.colorbar(sm, ax=list(axes[:-1]), label="layer depth index", shrink=0.8, pad=0.01)
else:
    figures.placeholder(profile_ax, "no probes")
fig.suptitle(f"Mean shift of conv outputs - {dataset} / {arch} (mean over seeds)")
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig2_mean_shift", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
