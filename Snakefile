# msr: the Mean Shift Rejection replication pipeline (DESIGN.md, "The rule graph").
#
#   download (CIFAR) -> prepare -> train (one job per run) -> aggregate
#     -> one notebook per figure/table -> figures/MANIFEST.json
#
#   snakemake --cores all                                           # default: digits, CPU, ~10 min
#   snakemake --cores all --workflow-profile workflow/profiles/paper  # CIFAR grid, GPU
#   snakemake --workflow-profile workflow/profiles/slurm             # the same on a SLURM cluster
#   snakemake --report results/report.html                          # HTML report with captions
#
# The grid comes from workflow/config/default.yaml (overlaid by a profile's configfile or
# --configfile / --config), validated against workflow/schemas/config.schema.yaml.

from snakemake.utils import min_version, validate

min_version("9.19")


configfile: "workflow/config/default.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
        "figures/MANIFEST.json",
