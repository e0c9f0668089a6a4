# One job per run of the grid (common.smk: RUNS). The job's output is the run directory's
# summary.json, which `msr train` writes last and atomically; the directory also holds
# config.json, metrics.csv, probes.csv and checkpoint.pt.
#
# Learning rates: every run trains at a FACTOR of its variant's own lrs (`--lr-factor`, every
# param group together). For the variants of `lr_selection`, the factor is data the DAG depends
# on: their validation runs (tag val-lrx<f>: trained on the training data less a held-out
# split, evaluated on it, never on the test set) -> the checkpoint `select_lr` (the rule:
# msr.pipeline.selection) -> their main-grid and sweep runs, whose input names the choice and
# whose params read it. Before the choice exists those params are <TBD> (`snakemake -n` still
# lists every main-grid run); an lr sweep point that the choice makes a main-grid run is not
# trained (common.smk: selected_summaries), so it appears only once the choice is made.
#
# A rerun of the same run (a killed or failed job) resumes from checkpoint.pt. A rerun because
# the run's options changed (Snakemake's params trigger, e.g. more epochs, or check_runs in
# analysis.smk) must start over: `msr reset-run` (msr.pipeline.grid.reset) clears the directory when its
# config.json records other options than the config gives (msr itself refuses to mix two
# configs in one directory).
#
# Resources: every train job takes one `gpu_slots` (a counter: a GPU profile's global
# `resources: gpu_slots: N` = GPUs x runs per GPU caps how many run at once; without it they are
# unlimited, as on a CPU). On a GPU, `msr train --gpu-slots K` (K = the config's
# resources.runs_per_gpu; 0 = off) then claims a free (GPU, slot) pair itself, since Snakemake
# assigns no GPU ids. K travels as the resource `runs_per_gpu`, not as a param: resources are no
# rerun trigger, so changing how runs share GPUs never retrains a finished run (and a profile can
# override it per rule with set-resources). `gpu` (GPUs per job) is declared only where the
# config asks for it (the SLURM plugin turns it into --gpus); otherwise a CUDA run asks a
# scheduler for a GPU through `gres` (cluster.smk; ignored by the local executor, where runs
# share GPUs through gpu_slots).


checkpoint select_lr:
    input:
        selection_runs_summaries(),
    output:
        json=SELECTION,
        table=report(SELECTION_TABLE, caption="../report/lr_selection.rst", category="Tables",
                     labels={"table": "lr selection"}),
        provenance=SELECTION_PROVENANCE,
    log:
        f"{LOGS}/select_lr.log",
    localrule: True
    run:
        selection.select(SELECTION_RUNS, RUNS_ROOT, out=output.json, table=output.table,
                         provenance=output.provenance, log=log[0])


rule train:
    input:
        data=lambda wildcards: processed_path(wildcards.dataset),
        selection=selection_input,
    output:
        f"{RUNS_ROOT}/{{dataset}}/{{arch}}/{{variant}}/{{tag}}/seed{{seed}}/summary.json",
    log:
        f"{LOGS}/train/{{dataset}}/{{arch}}/{{variant}}/{{tag}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{dataset}}/{{arch}}/{{variant}}/{{tag}}/seed{{seed}}.tsv"
    params:
        args=train_args,
        expected=expected_json,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    wildcard_constraints:  # the path's parts reach the shell command: the grid's values only
        dataset="|".join(re.escape(d) for d in catalog.DATASETS),
        arch=r"resnet\d+",
        variant="|".join(re.escape(v) for v in catalog.VARIANTS),
        seed=r"\d+",
        tag=r"[A-Za-z0-9._+-]+",
    threads: config["resources"]["threads"]
    resources:
        gpu_slots=1,
        runs_per_gpu=runs_per_gpu(),
        mem_mb=config["resources"]["mem_mb"],
        runtime=config["resources"]["runtime"],
        **({"gpu": config["resources"]["gpu"]} if config["resources"]["gpu"] > 0 else {}),
        **slurm_resources(gpu=train_requests_gpu()),
    conda:
        CONDA_ENV
    shell:
        "msr reset-run {params.out} {params.expected:q} > {log} 2>&1 && "
        "msr train {params.args} --threads {threads} --gpu-slots {resources.runs_per_gpu} --out {params.out} >> {log} 2>&1"
