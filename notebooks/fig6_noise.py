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
# # Figure 6 - noise magnitude
# METHOD.md claim 4: multiplicative noise injected throughout the network while training
# ("deep data augmentation", what BatchNorm's minibatch noise does implicitly) improves
# generalization.
#
# Left: final-epoch test accuracy (mean +- std over completed seeds) against the noise
# magnitude d (multiplier ~ U(1-d, 1+d) per sample and channel at every block input; d = 0 is
# noise off). Right: the train-test gap, final train accuracy minus final test accuracy, in
# points. Train accuracy is the running accuracy over the last epoch's (augmented, noisy)
# training batches, as logged - not a separate clean evaluation.

# %%
import pandas as pd

from msr import aggregate as agg
from msr import report

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = report.standalone_snakemake("fig6_noise", variants=["msr_noise"])

report.figure_style()
runs = pd.read_csv(snakemake.input.runs)
variants = report.ordered_variants(snakemake.params.variants)
sel = report.select_sweep(runs, variants, "noise_delta")
stats = agg.summarize(sel, metrics=["final_test_acc", "train_test_gap"],
                      by=["dataset", "arch", "variant", "noise_delta"])

# %%
fig, rows = report.sweep_axes(sel, "no noise sweep in this config")
for (dataset, arch), (ax_acc, ax_gap) in rows:
    here = stats[(stats["dataset"] == dataset) & (stats["arch"] == arch)]
    for variant in variants:
        s = report.plot_vs(ax_acc, here, variant, "noise_delta", "final_test_acc_mean")
        report.plot_vs(ax_gap, here, variant, "noise_delta", "train_test_gap_mean")
        for _, r in s[s["n_diverged"] > 0].iterrows():
            ax_acc.annotate(f"{int(r['n_diverged'])} diverged", (r["noise_delta"], 100 * r["final_test_acc_mean"]),
                            fontsize=6, color=report.variant_color(variant), xytext=(3, -8), textcoords="offset points")
    ax_gap.axhline(0, color="0.6", lw=0.8)
    ax_acc.set(title=f"{dataset} / {arch}: final test accuracy", xlabel="noise magnitude d", ylabel="test accuracy (%)")
    ax_gap.set(title=f"{dataset} / {arch}: train - test gap", xlabel="noise magnitude d", ylabel="gap (points)")
    ax_acc.legend(frameon=False)
report.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
report.write_provenance(snakemake.output.provenance, "fig6_noise", sel["run_id"],
                     [snakemake.output.png, snakemake.output.pdf], [snakemake.input.runs])
