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
# One row per comparison of docs/method.md, "Claims and verdicts" (claim 4: two, claim 6: one per
# peer) per dataset and arch, judged by ONE rule: `msr.analysis.claims` (unit-tested; its RULES
# are printed under the table). This notebook only measures what the rule needs and formats
# the table:
#
# - every run is TRAINED or FAILED (diverged, or ended at chance: final test accuracy below
#   chance + 0.5 x (1 - chance)) - `claims.run_outcome`, the definition every figure uses too;
# - accuracy claims (2 vs `nf`, 4, 5, 6): A - B of final test accuracy, paired by seed where the
#   sides ran the same seeds, with its 95% CI, the dataset's equivalence margin and a
#   Holm-adjusted p per claim;
# - claims 1-2: the learning-rate sweep (by lr factor of each variant's default when runs.csv
#   has `lr_factor`, else by absolute lr); a sweep point is judged with at least
#   `min_sweep_seeds` runs; claim 1's cause, the mean shift at initialization of `plain` vs
#   `msr`, is `by construction` (zero-mean init), shown measured from the step-0 probes;
# - claim 3, three measurements on one random batch, each from the trained weights of the
#   variant's first completed main-grid seed (its initialization if none): `msr` train vs eval
#   output (`by construction`: no layer depends on the mode), `msr_noise` eval output vs the
#   train-mode output of the same weights with the noise off (`noise_delta = 0`: the claim), and
#   `bn` train vs eval (the control: a test that could not see bn's difference could not see
#   any).
#
# The CSV keeps every number of `claims.claims_table` (counts per side, pairing, t and sign-flip
# intervals, p, test, Holm p, Fisher p, detail); the Markdown and LaTeX show the columns a reader
# needs (`figures.claims_display`).
#
# Snakemake interface: `input.runs` (runs.csv; `input.summary`/`input.curves` are accepted and
# unused); `output.csv`, `output.md`, `output.tex`, `output.provenance`; optional params:
# `num_classes` (dataset -> classes, for a dataset msr.catalog lacks), `margins` (dataset ->
# equivalence margin in POINTS, e.g. {fashion_mnist: 0.5}; others get `default_margin`, in points,
# default 0.5), `min_sweep_seeds` (runs a sweep point needs, default 2). Besides runs.csv it reads,
# for runs that runs.csv lists, the step-0 probes of `plain` and `msr` and one checkpoint each of
# `msr`, `msr_noise` and `bn` per dataset/arch. Only the test-set sweeps enter
# (`figures.TEST_SWEEPS`): validation-split selection runs never do.

# %%
from pathlib import Path

import pandas as pd
import torch

from msr import atomic, outcome
from msr.analysis import aggregate as agg
from msr.analysis import claims, figures
from msr.training.rundir import CHECKPOINT

try:
    snakemake  # noqa: B018 - injected by Snakemake's notebook: directive
except NameError:
    snakemake = figures.standalone_snakemake("tab3_claims", kind="table")

params = snakemake.params
num_classes = dict(getattr(params, "num_classes", None) or {})
margins_pp = dict(getattr(params, "margins", None) or {})  # points, as the config writes them
default_margin_pp = getattr(params, "default_margin", None)
default_margin = claims.DEFAULT_MARGIN if default_margin_pp is None else float(default_margin_pp) / 100
min_sweep_seeds = int(getattr(params, "min_sweep_seeds", None) or claims.MIN_SWEEP_SEEDS)
runs = figures.test_runs(pd.read_csv(snakemake.input.runs))
base = runs[runs["sweep"] == "base"] if not runs.empty else runs

# %% [markdown]
# Claim 1's cause: the mean shift at initialization (step-0 probes of the main grid's `plain`
# and `msr` runs). Claim 3: train- vs eval-mode outputs of `msr`, `msr_noise` (train mode with
# the noise off) and `bn` (the control).

# %%
shift_runs = base[base["variant"].isin(["plain", "msr"])] if not base.empty else base
probes = agg.load_probes(shift_runs["run_dir"], metrics=["mean_shift"]) if not shift_runs.empty else None


def train_eval(dataset, arch, variant, train_overrides=None):
    """{diff, scale, note}: max |train-mode - eval-mode output| and max |eval output| of
    ``variant`` on one random batch, from the trained weights of its first completed main-grid
    seed (its initialization if none); ``train_overrides`` change the train-mode model only."""
    sel = base[(base["dataset"] == dataset) & (base["arch"] == arch) & (base["variant"] == variant)
               & (base["status"] == "completed")].sort_values("seed")
    ckpt = Path(sel["run_dir"].iloc[0]) / CHECKPOINT if not sel.empty else None
    depth, classes = agg.depth_of_arch(arch), outcome.classes_of(dataset, num_classes)
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        stem = next(v for v in state.values() if v.ndim == 4)  # the first conv: [out, in, k, k]
        row = sel.iloc[0]
        size = int(row["image_size"]) if pd.notna(row.get("image_size")) else 32
        try:
            diff, scale = claims.train_eval_difference(
                variant, depth, classes, stem.shape[1], size, state_dict=state,
                overrides=claims.overrides_of(row), train_overrides=train_overrides)
        except RuntimeError as err:  # torch lists every mismatched tensor: keep the first
            raise RuntimeError(f"{ckpt} does not fit {variant} {dataset}/{arch}: "
                               f"{str(err).splitlines()[1].strip()[:160]}") from None
        return {"diff": diff, "scale": scale, "note": f"trained weights of {row['run_id']}"}
    # no trained model to load: the structure alone decides (3 input channels, 32 px)
    diff, scale = claims.train_eval_difference(variant, depth, classes, 3, 32, train_overrides=train_overrides)
    return {"diff": diff, "scale": scale, "note": "at initialization (no completed run)"}


identity = {}
for dataset, arch in figures.panels(base):
    identity[(dataset, arch)] = {
        "msr": train_eval(dataset, arch, "msr"),
        "msr_noise": train_eval(dataset, arch, "msr_noise", train_overrides={"noise_delta": 0}),
        "bn": train_eval(dataset, arch, "bn"),
    }

# %%
table = claims.claims_table(runs, probes=probes, identity=identity, num_classes=num_classes,
                            margins={d: float(m) / 100 for d, m in margins_pp.items()},
                            default_margin=default_margin, min_sweep_seeds=min_sweep_seeds)
atomic.atomic_write(snakemake.output.csv,
                    lambda tmp: table.to_csv(tmp, index=False, float_format="%.4g", lineterminator="\n"))
atomic.write_text(snakemake.output.md, figures.claims_markdown(table))
atomic.write_text(snakemake.output.tex, figures.claims_latex(table))
used = runs[runs["sweep"].isin(["base", "lr"])] if not runs.empty else runs  # the main grid and the lr sweep
figures.write_provenance(snakemake.output.provenance, "tab3_claims", used["run_id"],
                         [snakemake.output.csv, snakemake.output.md, snakemake.output.tex],
                         [snakemake.input.runs])
figures.claims_display(table)  # shown when run in Jupyter
