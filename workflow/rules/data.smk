# Data: download (CIFAR only; checksum verified by msr) -> prepare (processed uint8 cache).
# `digits` ships with scikit-learn and `synthetic` is generated: they need no download.


rule download:
    output:
        directory(f"{DATA_ROOT}/raw/{{folder}}"),
    log:
        "results/logs/download/{folder}.log",
    params:
        dataset=lambda wildcards: {v: k for k, v in CIFAR_FOLDERS.items()}[wildcards.folder],
        root=lambda wildcards, output: Path(output[0]).parent.parent,
    wildcard_constraints:
        folder="|".join(re.escape(f) for f in CIFAR_FOLDERS.values()),
    retries: 2
    conda:
        CONDA_ENV
    shell:
        "msr download --dataset {params.dataset} --data-root {params.root} > {log} 2>&1"


rule prepare:
    input:
        prepare_input,
    output:
        f"{DATA_ROOT}/processed/{{name}}.pt",
    log:
        "results/logs/prepare/{name}.log",
    params:
        dataset=lambda wildcards, output: PREPARED[output[0]],
        root=lambda wildcards, output: Path(output[0]).parent.parent,
        size=(f"--image-size {config['train']['image_size']}"
              if config["train"]["image_size"] is not None else ""),
    wildcard_constraints:
        name="|".join(re.escape(Path(p).stem) for p in PREPARED),
    conda:
        CONDA_ENV
    shell:
        "msr prepare --dataset {params.dataset} --data-root {params.root} {params.size} "
        "--no-download > {log} 2>&1"
