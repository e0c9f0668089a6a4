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
# # Table 1 - main ablation
# Final-epoch test accuracy (%) per dataset x arch x variant: mean +- std over the seeds that
# TRAINED, n = their number. A run FAILED when it diverged (non-finite loss) or ended at chance
# (final test accuracy below chance + 0.5 x (1 - chance)) - `msr.analysis.claims.run_outcome`,
# the definition of Table 3 and every figure; failed runs are counted beside the mean ("3/3
# trained" or "1/3 trained, 2 failed (1 diverged, 1 at chance)"), never averaged and never
# dropped silently. The best-epoch accuracy is selected on the test set and is shown for
# reference only (mean over the same trained seeds). The last columns are *published* BatchNorm
# ResNet numbers on CIFAR-10 (not runs of this pipeline): He et al. 2016 (Table 6) and
# Idelbayev's PyTorch reproduction (github.com/akamaster/pytorch_resnet_cifar10); none exist for
# CIFAR-100, Fashion-MNIST or digits.
#
# Writes CSV (all numbers, machine-readable), Markdown and LaTeX (booktabs).
# Snakemake interface: `input.runs`; `output.csv`, `output.md`, `output.tex`, `output.provenance`;
# `params.variants`; optional `params.num_classes`.

# %%
import pandas as pd

from msr import atomic
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("tab1_ablation", kind="table", variants=list(figures.VARIANT_ORDER))

runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
variants = figures.ordered_variants(snakemake.params.variants)
base = runs[(runs["sweep"] == "base") & runs["variant"].isin(variants)] if not runs.empty else runs
base = figures.with_outcomes(base, num_classes)
stats = figures.summarize_outcomes(base, by=["dataset", "arch", "depth", "variant"],
                                   metrics=["final_test_acc", "best_test_acc"])
REFS = {"He et al. 2016": "ref_he2016_bn", "Idelbayev (PyTorch)": "ref_idelbayev_bn"}

# %%
rows = []
order = {v: i for i, v in enumerate(variants)}
stats = stats.assign(_v=stats["variant"].map(order)).sort_values(["dataset", "depth", "_v"]) if not stats.empty else stats
for _, s in stats.iterrows():
    spec = base[(base["dataset"] == s["dataset"]) & (base["arch"] == s["arch"]) & (base["variant"] == s["variant"])].iloc[0]
    row = {
        "dataset": s["dataset"], "arch": s["arch"], "variant": s["variant"],
        "claim": spec.get("spec_claim", ""), "description": spec.get("spec_description", ""),
        "n_runs": int(s["n"]), "n_trained": int(s["n_trained"]), "n_failed": int(s["n_failed"]),
        "n_diverged": int(s["n_diverged"]), "n_at_chance": int(s["n_at_chance"]),
        "final_test_acc_mean": 100 * s["final_test_acc_mean"], "final_test_acc_std": 100 * s["final_test_acc_std"],
        "final_test_acc_ci95": 100 * s["final_test_acc_ci95"],
        "final_test_acc_min": 100 * s["final_test_acc_min"], "final_test_acc_max": 100 * s["final_test_acc_max"],
        "best_epoch_test_acc_mean": 100 * s["best_test_acc_mean"],
    }
    for name, col in REFS.items():
        row[col] = figures.PUBLISHED_REFERENCES[name].get((s["dataset"], s["arch"]))
    rows.append(row)
table = pd.DataFrame(rows, columns=["dataset", "arch", "variant", "claim", "description", "n_runs", "n_trained",
                                    "n_failed", "n_diverged", "n_at_chance", "final_test_acc_mean",
                                    "final_test_acc_std", "final_test_acc_ci95", "final_test_acc_min",
                                    "final_test_acc_max", "best_epoch_test_acc_mean", *REFS.values()])
atomic.atomic_write(snakemake.output.csv,  # a killed job never leaves half a table
                    lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n"))


# %%
def display(pm):
    def spread(r):
        if r.n_trained < 2:
            return ""
        return f"{r.final_test_acc_min:.2f}-{r.final_test_acc_max:.2f}"

    out = pd.DataFrame({
        "dataset": table["dataset"], "arch": table["arch"], "variant": table["variant"], "claim": table["claim"],
        "final test acc. % (mean ± std, n trained)": [
            figures.format_mean_std(r.final_test_acc_mean / 100, r.final_test_acc_std / 100, r.n_trained, pm=pm)
            for r in table.itertuples()],
        "min-max %": [spread(r) for r in table.itertuples()],
        "runs": [figures.outcome_text(r.n_runs, r.n_trained, r.n_diverged, r.n_at_chance) for r in table.itertuples()],
        "best-epoch % †": [("" if pd.isna(v) else f"{v:.2f}") for v in table["best_epoch_test_acc_mean"]],
    })
    for name, col in REFS.items():
        out[f"{name} (BN) ‡"] = ["" if pd.isna(v) else f"{v:.2f}" for v in table[col]]
    return out


NOTES = [
    "Final-epoch test accuracy over the seeds that trained (mean ± std, min-max). A run failed when it "
    f"diverged (non-finite loss) or ended at chance ({figures.FAILURE_RULE}); failed runs are "
    "counted under runs, never averaged.",
    "† Best epoch selected on the test set (mean over the trained seeds): reference only, not a result.",
    "‡ Published BatchNorm numbers on CIFAR-10 (test accuracy %), not runs of this pipeline: "
    "He et al. 2016, Table 6 (ResNet-110: mean of 5 runs, best 93.57); "
    "Idelbayev, github.com/akamaster/pytorch_resnet_cifar10.",
]
atomic.write_text(snakemake.output.md, "**Table 1 - main ablation.**\n\n" + figures.to_markdown(display("±"), notes=NOTES))
atomic.write_text(snakemake.output.tex, figures.to_latex(display("±"), caption="Main ablation: final-epoch test accuracy (%).",
                                                         label="tab:ablation", notes=NOTES))
figures.write_provenance(snakemake.output.provenance, "tab1_ablation", base["run_id"],
                         [snakemake.output.csv, snakemake.output.md, snakemake.output.tex], [snakemake.input.runs])
table  # noqa: B018 - shown when run in Jupyter
