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
# # Figure 4 - the zero-mean isocline
# docs/method.md, claim 2: ZMI puts every spatial kernel on the zero-mean "isocline" and ZMG keeps it
# there for the whole run; ZMI alone drifts off it, ZMG alone keeps the initial slice means
# frozen (`zmg`, non-zero), and `nf` has neither.
#
# Per spatial conv: RMS of the kernel slice means / RMS of the weight (msr.training.probes
# `slice_mean_rms`). Line: median over layers (mean over seeds); band: min to max over layers.
# Values below 1e-9 (float precision) are drawn at 1e-9.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from msr.analysis import aggregate as agg
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("fig4_isocline", variants=["nf", "zmi", "zmg", "msr"],
                                         dataset="digits", arch="resnet20")

figures.figure_style()
FLOOR = 1e-9
runs = pd.read_csv(snakemake.input.runs)
dataset, arch = snakemake.params.dataset, snakemake.params.arch
variants = figures.ordered_variants(snakemake.params.variants)
sel = runs[(runs["sweep"] == "base") & (runs["dataset"] == dataset) & (runs["arch"] == arch)
           & runs["variant"].isin(variants)] if not runs.empty else runs
probes = agg.load_probes(sel["run_dir"], metrics=["slice_mean_rms"]) if not sel.empty else None

# %%
fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
if probes is None or probes.empty:
    figures.placeholder(ax, "no runs of nf / zmi / zmg / msr in this config")
else:
    probes = probes.merge(sel[["run_id", "variant"]], on="run_id")
    for variant in variants:
        p = probes[probes["variant"] == variant]
        if p.empty:
            continue
        per_layer = p.groupby(["step", "layer"])["value"].mean().reset_index()
        band = per_layer.groupby("step")["value"].agg(["median", "min", "max"]).reset_index()
        color = figures.variant_color(variant)
        ax.plot(band["step"], band["median"].clip(lower=FLOOR), color=color, lw=1.5, label=variant)
        ax.fill_between(band["step"], band["min"].clip(lower=FLOOR), band["max"].clip(lower=FLOOR),
                        color=color, alpha=0.15, lw=0)
    ax.set(yscale="log", xlabel="step", ylabel="RMS(slice means) / RMS(weights)",
           title=f"Kernel slice means over training - {dataset} / {arch}")
    top = max(1.0, float(probes["value"].max()) * 2)
    ax.set_ylim(FLOOR / 2, top)  # fixed floor: float-precision zeros must look like zeros
    ax.axhspan(FLOOR / 2, 1e-6, color="0.92", lw=0, zorder=0)
    ax.text(0.01, 0.02, "float32 rounding level", transform=ax.transAxes, fontsize=7, color="0.4")
    ax.legend(frameon=False)
figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
figures.write_provenance(snakemake.output.provenance, "fig4_isocline", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
