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
# # Table 2 - cost
# Time per training step, throughput and peak memory per variant (main grid), mean +- std over
# the seeds with at least one finished epoch (a diverged run's epochs before it diverged count
# too; `n_timed` says how many). Peak memory is the
# CUDA allocator's peak on a GPU, the whole process's max RSS on a CPU (see the `memory`
# column), so CPU numbers include torch itself. The projection (ZMG) and noise costs show up as
# differences between variants on the same device.

# %%
import pandas as pd

from msr.analysis import aggregate as agg
from msr import atomic
from msr.analysis import figures

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("tab2_cost", kind="table", variants=list(figures.VARIANT_ORDER))

runs = pd.read_csv(snakemake.input.runs)
variants = figures.ordered_variants(snakemake.params.variants)
base = runs[(runs["sweep"] == "base") & runs["variant"].isin(variants)] if not runs.empty else runs

# %%
rows = []
order = {v: i for i, v in enumerate(variants)}
keys = ["dataset", "arch", "depth", "variant"]
groups = base.assign(_v=base["variant"].map(order)).groupby(["dataset", "depth", "_v", "arch", "variant"]) if not base.empty else []
for (dataset, _, _, arch, variant), g in groups:
    timed = g[g["epochs_completed"] > 0]  # a run that diverged inside its first epoch has no timed epoch
    step_mean, step_std, _, n = agg.mean_std_ci(1000 * timed["mean_step_seconds"])
    ips_mean, ips_std, _, _ = agg.mean_std_ci(timed["images_per_s"])
    mem_mean, mem_std, _, _ = agg.mean_std_ci(g["peak_memory_mb"])
    rows.append({
        "dataset": dataset, "arch": arch, "variant": variant, "n_runs": len(g), "n_timed": n,
        "step_ms_mean": step_mean, "step_ms_std": step_std,
        "images_per_s_mean": ips_mean, "images_per_s_std": ips_std,
        "peak_memory_mb_mean": mem_mean, "peak_memory_mb_std": mem_std,
        "memory": " ".join(sorted(set(g.get("peak_memory_kind", pd.Series(["?"])).astype(str)))),
        "n_params": int(g["n_params"].iloc[0]) if "n_params" in g else None,
        "batch_size": " ".join(str(b) for b in sorted(set(g["batch_size"]))),
        "threads": " ".join(str(t) for t in sorted(set(g["threads"]))) if "threads" in g else "",
        "device": " ".join(sorted(set(g["device_name"].astype(str)))) if "device_name" in g else "",
    })
table = pd.DataFrame(rows, columns=["dataset", "arch", "variant", "n_runs", "n_timed", "step_ms_mean", "step_ms_std",
                                    "images_per_s_mean", "images_per_s_std", "peak_memory_mb_mean",
                                    "peak_memory_mb_std", "memory", "n_params", "batch_size", "threads", "device"])
atomic.atomic_write(snakemake.output.csv,  # a killed job never leaves half a table
                    lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n"))


# %%
def pm(mean, std, digits):
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


display = pd.DataFrame({
    "dataset": table["dataset"], "arch": table["arch"], "variant": table["variant"],
    "ms / step": [pm(r.step_ms_mean, r.step_ms_std, 1) for r in table.itertuples()],
    "images / s": [pm(r.images_per_s_mean, r.images_per_s_std, 0) for r in table.itertuples()],
    "peak memory (MB)": [pm(r.peak_memory_mb_mean, r.peak_memory_mb_std, 0) for r in table.itertuples()],
    "memory measured as": table["memory"], "parameters": table["n_params"],
    "batch": table["batch_size"], "threads": table["threads"], "device": table["device"],
})
NOTES = ["Mean ± std over seeds. Peak memory: cuda_max_allocated on a GPU; process_max_rss "
         "(whole process, torch included) on a CPU."]
atomic.write_text(snakemake.output.md, "**Table 2 - cost per variant.**\n\n" + figures.to_markdown(display, notes=NOTES))
atomic.write_text(snakemake.output.tex, figures.to_latex(display, caption="Cost per variant: time per step, throughput, peak memory.",
                                                        label="tab:cost", notes=NOTES))
figures.write_provenance(snakemake.output.provenance, "tab2_cost", base["run_id"],
                     [snakemake.output.csv, snakemake.output.md, snakemake.output.tex], [snakemake.input.runs])
display  # noqa: B018 - shown when run in Jupyter
