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
# # Table 3 - the paper's claims, judged from the runs
# One row per claim of docs/method.md, "Claims, verdicts and the rule" (claim 6: one row per peer) per dataset
# and arch: the comparison it rests on, the effect with its 95% confidence interval, n per
# side (and how many of those seeds diverged), a verdict - `supported`, `contradicted`,
# `inconclusive` - and the reason for it. The rule is `msr.analysis.claims` (one function, unit-tested;
# it is printed under the table):
#
# - accuracy effects (claims 2 vs `nf`, 4, 5, 6): difference of final-epoch test accuracy means
#   over completed seeds, A - B, in points, with a Welch t interval;
# - claim 1: `plain` vs `bn` stability over the learning-rate sweep (effect shown: difference of
#   divergence rates with a Newcombe score interval) and the mean shift of the deepest conv at
#   initialization, `plain` - `msr`, from the runs' step-0 probes;
# - claim 2: highest stable learning rate of `msr`, `bn`, `plain` over the lr sweep, and
#   `msr` - `nf` at the default learning rate;
# - claim 3: a test - the same `msr` model (trained weights of its first completed main-grid
#   seed; its initialization if none) gives identical outputs in train and eval mode on one
#   random batch; `bn` is measured the same way as a control that the test can fail.
#
# Snakemake interface: `input.runs` (runs.csv; `input.summary`/`input.curves` are accepted and
# unused); `output.csv`, `output.md`, `output.tex`, `output.provenance`; optional
# `params.num_classes` (dataset -> number of classes, for a dataset `msr.analysis.claims.NUM_CLASSES`
# does not list; the chance level is 1 / classes). Besides runs.csv it reads, for the run
# directories runs.csv lists, the `msr`/`plain` probes (step 0) and one `msr`/`bn` checkpoint
# per dataset/arch.

# %%
import math
from pathlib import Path

import pandas as pd
import torch

from msr.analysis import aggregate as agg
from msr.analysis import claims, figures
from msr import atomic
from msr.training.rundir import CHECKPOINT

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("tab3_claims", kind="table")

runs = pd.read_csv(snakemake.input.runs)
num_classes = dict(getattr(snakemake.params, "num_classes", None) or {})
base = runs[runs["sweep"] == "base"] if not runs.empty else runs

# %% [markdown]
# Claim 1's cause: the mean shift at initialization (step-0 probes of the main grid's `plain`
# and `msr` runs). Claim 3: train-mode vs eval-mode outputs of `msr` (and `bn`, the control).

# %%
shift_runs = base[base["variant"].isin(["plain", "msr"])] if not base.empty else base
probes = agg.load_probes(shift_runs["run_dir"], metrics=["mean_shift"]) if not shift_runs.empty else None


def train_eval(dataset, arch, variant):
    """(max |train - eval|, max |eval output|, what was measured) for one variant; trained
    weights of its first completed main-grid seed when there is one."""
    sel = base[(base["dataset"] == dataset) & (base["arch"] == arch) & (base["variant"] == variant)
               & (base["status"] == "completed")].sort_values("seed")
    ckpt = Path(sel["run_dir"].iloc[0]) / CHECKPOINT if not sel.empty else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        stem = next(v for v in state.values() if v.ndim == 4)  # the first conv: [out, in, k, k]
        row = sel.iloc[0]
        size = int(row["image_size"]) if pd.notna(row.get("image_size")) else 32
        try:
            diff, scale = claims.train_eval_difference(
                variant, agg.depth_of_arch(arch), claims.classes_of(dataset, num_classes),
                stem.shape[1], size, state_dict=state, overrides=claims.overrides_of(row))
        except RuntimeError as err:  # torch lists every mismatched tensor: keep the first
            raise RuntimeError(f"{ckpt} does not fit {variant} {dataset}/{arch}: "
                               f"{str(err).splitlines()[1].strip()[:160]}") from None
        return diff, scale, f"trained weights of {row['run_id']}"
    # no trained model to load: the structure alone decides (3 input channels, 32 px)
    diff, scale = claims.train_eval_difference(
        variant, agg.depth_of_arch(arch), claims.classes_of(dataset, num_classes), 3, 32)
    return diff, scale, "at initialization (no completed run)"


identity = {}
for dataset, arch in figures.panels(runs):
    diff, scale, what = train_eval(dataset, arch, "msr")
    control, _, _ = train_eval(dataset, arch, "bn")
    identity[(dataset, arch)] = {"diff": diff, "scale": scale, "control": control, "note": what}

# %%
table = claims.claims_table(runs, probes=probes, identity=identity, num_classes=num_classes)
atomic.atomic_write(snakemake.output.csv,
                    lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f", lineterminator="\n"))


# %%
def effect_text(r):
    """The effect and its CI in the unit of the row."""
    if r.unit == "lr":
        return f"highest stable lr: {r.detail}"
    if r.unit == "abs":
        return r.detail
    if not math.isfinite(r.effect):
        return "-"
    if r.unit == "pp":
        what = " diverged" if r.ci_method.startswith("Newcombe") else ""
        return f"{r.effect:+.2f} pp{what} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
    return f"{r.effect:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}]"


display = pd.DataFrame({
    "dataset": table["dataset"], "arch": table["arch"], "claim": table["claim"],
    "comparison (A - B)": table["comparison"],
    "effect [95% CI]": [effect_text(r) for r in table.itertuples()],
    "seeds: A / B": table["seeds"],
    "verdict": table["verdict"], "reason": table["reason"],
})
NOTES = [
    *claims.RULES,
    "CI: Welch t for accuracy and mean-shift differences (pp = percentage points); Newcombe score "
    "interval for the difference of divergence rates pooled over the lr sweep.",
    "seeds: runs per side (claim 2: msr / bn / plain over the common lrs); div. = seeds whose "
    "loss became non-finite (in no mean).",
]
atomic.write_text(snakemake.output.md, "**Table 3 - the paper's claims, judged from the runs.**\n\n"
                  + figures.to_markdown(display, notes=NOTES))
atomic.write_text(snakemake.output.tex, figures.to_latex(
    display, caption="The paper's claims (docs/method.md) judged from the runs: effect, 95% CI, verdict.",
    label="tab:claims", notes=NOTES))
used = runs[runs["sweep"].isin(["base", "lr"])] if not runs.empty else runs  # the main grid and the lr sweep
figures.write_provenance(snakemake.output.provenance, "tab3_claims", used["run_id"],
                        [snakemake.output.csv, snakemake.output.md, snakemake.output.tex],
                        [snakemake.input.runs])
display  # noqa: B018 - shown when run in Jupyter
