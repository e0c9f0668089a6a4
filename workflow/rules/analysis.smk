# Analysis: every run directory -> check_runs -> aggregated tables -> one notebook per
# figure/table (common.smk: ANALYSES) -> figures/<set>/MANIFEST.json. Notebooks read only the
# aggregated tables and run directories; they never train. Each one also leaves
# results/<set>/provenance/<name>.json (the runs it used and the files it wrote) for the
# manifest, and its executed copy in results/<set>/notebooks/<name>.ipynb (kept even on failure).
#
# Edit a figure: snakemake --cores 1 --edit-notebook figures/<set>/<name>.png
# (opens the notebook with this run's inputs; then `jupytext --sync notebooks/<name>.ipynb` and
# `jupytext --to ipynb notebooks/<name>.py` to store it without outputs - see notebooks/README.md)


# The gate before aggregation: every run directory's config.json records the options this
# config gives (msr.pipeline.grid). Snakemake notices a config edit through its metadata in
# .snakemake/ and retrains; without that metadata (a fresh clone with copied results, or
# --rerun-triggers mtime) this check catches it: stale runs lose their summary.json and the
# pipeline stops naming them, so the next run retrains them. Its output is named by the hash
# of every run's expected options, so it reruns whenever they change.
# Runs whose lr factor was chosen on the validation split are checked against the choice
# (lr_selection.json): a changed choice makes their earlier runs stale too.
rule check_runs:
    input:
        summaries=all_summaries,
        selection=[SELECTION] if SELECTING else [],
    output:
        RUNS_CHECKED,
    log:
        f"{LOGS}/check_runs.log",
    localrule: True
    run:
        check_all_runs(input.selection, output[0], log[0])


# runs.csv holds every run, the validation runs of the lr selection too (sweep lr_selection,
# eval_split validation: their "test" accuracy is validation accuracy, kept apart everywhere)
rule aggregate:
    input:
        summaries=all_summaries,
        checked=RUNS_CHECKED,
        selection=[SELECTION] if SELECTING else [],
    output:
        **TABLES,
    log:
        f"{LOGS}/aggregate.log",
    params:
        root=lambda wildcards, input: RUNS_ROOT,  # run ids are paths below it
        out=lambda wildcards, output: os.path.dirname(output.runs),
        selection=lambda wildcards, input: f"--lr-selection {input.selection[0]}" if SELECTING else "",
    resources:
        **slurm_resources(),
    conda:
        CONDA_ENV
    shell:
        "msr aggregate --runs {params.root} --out {params.out} {params.selection} {input.summaries} > {log} 2>&1"


# One notebook rule per entry of ANALYSES; a figure writes png + pdf, a table csv + md + tex,
# each with a caption in workflow/report/<name>.rst for `snakemake --report`.
for _item in ANALYSES:
    _files = analysis_files(_item)
    _caption = f"../report/{_item['name']}.rst"
    if _item["kind"] == "figure":
        _outputs = dict(
            png=report(_files[0], caption=_caption, category="Figures", labels={"figure": _item["label"]}),
            pdf=_files[1],
        )
    else:
        _outputs = dict(
            csv=report(_files[0], caption=_caption, category="Tables", labels={"table": _item["label"]}),
            md=_files[1],
            tex=_files[2],
        )

    rule:
        name:
            _item["name"]
        input:
            **TABLES,
        output:
            **_outputs,
            provenance=f"{RESULTS}/provenance/{_item['name']}.json",
        log:
            notebook=f"{RESULTS}/notebooks/{_item['name']}.ipynb",
        params:
            **_item["params"],
            # the notebook directive's path is evaluated again when the job runs, after this loop
            # has moved on: name it through a param (formatted per job), not through _item
            notebook=_item["name"],
        resources:
            **slurm_resources(),
        conda:
            CONDA_ENV
        notebook:
            "../../notebooks/{params.notebook}.ipynb"


# The set's manifest: every file of every figure/table with its sha256, the runs each was made
# from (provenance) with their directories and file hashes, the code's git commit, and the
# config (its hash, and the resolved config itself, also kept as results/<set>/config.json).
# A set interrupted while its notebooks ran is a mix of old and new files until the next run
# (`make run` finishes it); `msr verify figures/<set>` tells which files no longer match.
rule manifest:
    input:
        files=all_outputs(),
        provenance=all_provenance(),
        runs=TABLES["runs"],
    output:
        manifest=MANIFEST,
        config=f"{RESULTS}/config.json",
    log:
        f"{LOGS}/manifest.log",
    params:
        config_sha256=config_sha256(),
        config_json=config_json(),
        runs_root=lambda wildcards, input: RUNS_ROOT,
    resources:
        **slurm_resources(),
    conda:
        CONDA_ENV
    shell:
        "printf '%s\\n' {params.config_json:q} > {output.config} && "
        "msr manifest --provenance {input.provenance} --runs-table {input.runs} --runs {params.runs_root} "
        "--config-sha256 {params.config_sha256} --config-record {output.config} "
        "--out {output.manifest} > {log} 2>&1"
