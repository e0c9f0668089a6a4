# msr: the Mean Shift Rejection replication pipeline (docs/architecture.md, "The rule graph").
#
#   download (CIFAR) -> prepare -> train (one job per run) -> check_runs -> aggregate
#     -> one notebook per figure/table -> figures/<set>/MANIFEST.json
#   with lr_selection: validation runs -> checkpoint select_lr -> the tuned variants' runs
#
#   snakemake --cores all                                                  # set digits: CPU, ~10 min
#   snakemake --cores all --workflow-profile workflow/profiles/fashion-cpu  # Fashion-MNIST, 2 CPU cores
#   snakemake --cores all --workflow-profile workflow/profiles/fashion      # Fashion-MNIST, one GPU
#   snakemake --cores all --workflow-profile workflow/profiles/paper        # CIFAR grid, GPU
#   snakemake --workflow-profile workflow/profiles/slurm                    # the paper grid on a SLURM cluster
#   snakemake --report results/digits/report.html                          # HTML report with captions
#
# The grid comes from workflow/config/default.yaml (overlaid by a profile's configfile or
# --configfile / --config), validated against workflow/schemas/config.schema.yaml (in
# workflow/rules/common.smk, with the checks the schema cannot make). Its `name:` is the set:
# everything it writes goes to results/<name>/ and figures/<name>/.

from snakemake.utils import min_version, validate

min_version("9.19")


configfile: "workflow/config/default.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"


# Everything, intermediates included: a run summary or table deleted by a failed or killed
# job is rebuilt even when the figures exist (Snakemake does not rebuild a missing
# intermediate whose consumers are up to date).
rule all:
    default_target: True
    input:
        static_summaries(),
        selected_summaries,  # lr sweep points known once the lr selection has chosen
        RUNS_CHECKED,
        TABLES.values(),
        all_outputs(),
        MANIFEST,
