# Data: download (CIFAR only; checksum verified by msr) -> prepare (processed uint8 cache).
# `digits` ships with scikit-learn and `synthetic` is generated; `fashion_mnist` is found by msr
# itself (an extracted copy under <data_root>/raw/, the mirror folder - train.data_mirror, by
# default Debian's dataset-fashion-mnist package - then the official download): no input.
# data/ is shared by every config set; the logs are the set's.


rule download:
    output:
        directory(f"{DATA_ROOT}/raw/{{folder}}"),
    log:
        f"{LOGS}/download/{{folder}}.log",
    params:
        dataset=lambda wildcards: {v: k for k, v in CIFAR_FOLDERS.items()}[wildcards.folder],
        root=lambda wildcards, output: sh(Path(output[0]).parent.parent),  # quoted: any path
    wildcard_constraints:
        folder="|".join(re.escape(f) for f in CIFAR_FOLDERS.values()),
    # on a cluster, where compute nodes often have no internet, the download runs on the
    # submitting host
    localrule: True
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
        f"{LOGS}/prepare/{{name}}.log",
    params:
        dataset=lambda wildcards, output: PREPARED[output[0]],
        root=lambda wildcards, output: sh(Path(output[0]).parent.parent),  # quoted: any path
        size=(f"--image-size {config['train']['image_size']}"
              if config["train"]["image_size"] is not None else ""),
        mirror=(f"--mirror {sh(config['train']['data_mirror'])}"
                if config["train"]["data_mirror"] is not None else ""),
        # CIFAR comes from the download rule; Fashion-MNIST may still need its download
        no_download=lambda wildcards, output: "--no-download" if PREPARED[output[0]] in CIFAR_FOLDERS else "",
    resources:
        **slurm_resources(),
    wildcard_constraints:
        name="|".join(re.escape(Path(p).stem) for p in PREPARED),
    conda:
        CONDA_ENV
    shell:
        "msr prepare --dataset {params.dataset} --data-root {params.root} {params.size} "
        "{params.mirror} {params.no_download} > {log} 2>&1"
