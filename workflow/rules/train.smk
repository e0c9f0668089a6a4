# One job per run of the grid (common.smk: RUNS). The job's output is the run directory's
# summary.json, which `msr train` writes last and atomically; the directory also holds
# config.json, metrics.csv, probes.csv and checkpoint.pt.
#
# A rerun of the same run (a killed or failed job) resumes from checkpoint.pt. A rerun because
# the run's options changed (Snakemake's params trigger, e.g. more epochs) must start over:
# the options of the last attempt are kept in .snakemake-args and the directory is cleared
# when they differ (msr itself refuses to mix two configs in one directory).


rule train:
    input:
        data=lambda wildcards: processed_path(wildcards.dataset),
    output:
        f"{RUNS_ROOT}/{{dataset}}/{{arch}}/{{variant}}/{{tag}}/seed{{seed}}/summary.json",
    log:
        "results/logs/train/{dataset}/{arch}/{variant}/{tag}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{arch}/{variant}/{tag}/seed{seed}.tsv"
    params:
        args=train_args,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    wildcard_constraints:
        seed=r"\d+",
        tag=r"[A-Za-z0-9._+-]+",
    threads: config["resources"]["threads"]
    resources:
        gpu=config["resources"]["gpu"],
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
    conda:
        CONDA_ENV
    shell:
        "mkdir -p {params.out}; "
        "if [ -f {params.out}/.snakemake-args ] && "
        "[ \"$(cat {params.out}/.snakemake-args)\" != {params.args:q} ]; then "
        "rm -rf {params.out} && mkdir -p {params.out}; fi; "
        "printf '%s' {params.args:q} > {params.out}/.snakemake-args; "
        "msr train {params.args} --threads {threads} --out {params.out} > {log} 2>&1"
