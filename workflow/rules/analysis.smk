# Analysis: every run directory -> aggregated tables -> one notebook per figure/table ->
# figures/MANIFEST.json. Notebooks read only the aggregated tables and run directories; they
# never train. Each one also leaves results/provenance/<name>.json (the runs it used) for the
# manifest, and its executed copy in results/notebooks/<name>.ipynb (kept even on failure).
#
# Edit a figure: snakemake --cores 1 --edit-notebook figures/<name>.png
# (opens the notebook with this run's inputs; then `jupytext --sync notebooks/<name>.ipynb` and
# `jupytext --to ipynb notebooks/<name>.py` to store it without outputs - see notebooks/README.md)

rule aggregate:
    input:
        all_summaries(),
    output:
        runs=TABLES["runs"],
        summary=TABLES["summary"],
        curves=TABLES["curves"],
    log:
        "results/logs/aggregate.log",
    params:
        root=lambda wildcards, input: RUNS_ROOT,  # run ids are paths below it
        out=lambda wildcards, output: os.path.dirname(output.runs),
    conda:
        CONDA_ENV
    shell:
        "msr aggregate --runs {params.root} --out {params.out} {input} > {log} 2>&1"


rule fig1_curves:
    input:
        **TABLES,
    output:
        png=report("figures/fig1_curves.png", caption="../report/fig1_curves.rst",
                   category="Figures", labels={"figure": "1 training curves"}),
        pdf="figures/fig1_curves.pdf",
        provenance="results/provenance/fig1_curves.json",
    log:
        notebook="results/notebooks/fig1_curves.ipynb",
    params:
        variants=config["variants"],
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig1_curves.ipynb"


rule fig2_mean_shift:
    input:
        **TABLES,
    output:
        png=report("figures/fig2_mean_shift.png", caption="../report/fig2_mean_shift.rst",
                   category="Figures", labels={"figure": "2 mean shift"}),
        pdf="figures/fig2_mean_shift.pdf",
        provenance="results/provenance/fig2_mean_shift.json",
    log:
        notebook="results/notebooks/fig2_mean_shift.ipynb",
    params:
        variants=["plain", "bn", "zmi", "msr"],
        **PROBE_SELECTION,
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig2_mean_shift.ipynb"


rule fig3_lr_stability:
    input:
        **TABLES,
    output:
        png=report("figures/fig3_lr_stability.png", caption="../report/fig3_lr_stability.rst",
                   category="Figures", labels={"figure": "3 learning-rate stability"}),
        pdf="figures/fig3_lr_stability.pdf",
        provenance="results/provenance/fig3_lr_stability.json",
    log:
        notebook="results/notebooks/fig3_lr_stability.ipynb",
    params:
        **sweep_params("lr"),
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig3_lr_stability.ipynb"


rule fig4_isocline:
    input:
        **TABLES,
    output:
        png=report("figures/fig4_isocline.png", caption="../report/fig4_isocline.rst",
                   category="Figures", labels={"figure": "4 isocline"}),
        pdf="figures/fig4_isocline.pdf",
        provenance="results/provenance/fig4_isocline.json",
    log:
        notebook="results/notebooks/fig4_isocline.ipynb",
    params:
        variants=["nf", "zmi", "zmg", "msr"],
        **PROBE_SELECTION,
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig4_isocline.ipynb"


rule fig5_batch_size:
    input:
        **TABLES,
    output:
        png=report("figures/fig5_batch_size.png", caption="../report/fig5_batch_size.rst",
                   category="Figures", labels={"figure": "5 batch size"}),
        pdf="figures/fig5_batch_size.pdf",
        provenance="results/provenance/fig5_batch_size.json",
    log:
        notebook="results/notebooks/fig5_batch_size.ipynb",
    params:
        **sweep_params("batch_size"),
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig5_batch_size.ipynb"


rule fig6_noise:
    input:
        **TABLES,
    output:
        png=report("figures/fig6_noise.png", caption="../report/fig6_noise.rst",
                   category="Figures", labels={"figure": "6 noise magnitude"}),
        pdf="figures/fig6_noise.pdf",
        provenance="results/provenance/fig6_noise.json",
    log:
        notebook="results/notebooks/fig6_noise.ipynb",
    params:
        **sweep_params("noise_delta"),
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/fig6_noise.ipynb"


rule tab1_ablation:
    input:
        **TABLES,
    output:
        csv=report("figures/tab1_ablation.csv", caption="../report/tab1_ablation.rst",
                   category="Tables", labels={"table": "T1 main ablation"}),
        md="figures/tab1_ablation.md",
        tex="figures/tab1_ablation.tex",
        provenance="results/provenance/tab1_ablation.json",
    log:
        notebook="results/notebooks/tab1_ablation.ipynb",
    params:
        variants=config["variants"],
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/tab1_ablation.ipynb"


rule tab2_cost:
    input:
        **TABLES,
    output:
        csv=report("figures/tab2_cost.csv", caption="../report/tab2_cost.rst",
                   category="Tables", labels={"table": "T2 cost"}),
        md="figures/tab2_cost.md",
        tex="figures/tab2_cost.tex",
        provenance="results/provenance/tab2_cost.json",
    log:
        notebook="results/notebooks/tab2_cost.ipynb",
    params:
        variants=config["variants"],
    conda:
        CONDA_ENV
    notebook:
        "../../notebooks/tab2_cost.ipynb"


rule manifest:
    input:
        files=all_outputs(),
        provenance=expand("results/provenance/{name}.json", name=FIGURES + TABLES_OUT),
        runs=TABLES["runs"],
    output:
        "figures/MANIFEST.json",
    log:
        "results/logs/manifest.log",
    params:
        config_sha256=config_sha256(),
    conda:
        CONDA_ENV
    shell:
        "msr manifest --provenance {input.provenance} --runs-table {input.runs} "
        "--config-sha256 {params.config_sha256} --out {output} > {log} 2>&1"
