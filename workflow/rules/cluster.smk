# Running on a cluster (workflow/profiles/slurm): what every job asks the scheduler for, and what
# must not follow the jobs there. Functions and a start hook only - no rules here.
#
# Settings (environment variables, read here and nowhere else, so the profile names no partition,
# account or GPU type of any particular cluster):
#   MSR_SLURM_PARTITION      partition of every job          (unset: the cluster's default partition)
#   MSR_SLURM_GPU_PARTITION  partition of GPU train jobs     (unset: MSR_SLURM_PARTITION)
#   MSR_SLURM_ACCOUNT        account charged for every job   (unset: the plugin's guess, or none)
#   MSR_SLURM_GPU_GRES       what a GPU train job asks for   (unset: gpu:1; e.g. gpu:a100:1, shard:1)
# They become the resources slurm_partition, slurm_account and gres, which Snakemake's SLURM
# executor plugin turns into sbatch -p, -A and --gres. Other executors ignore them, so a local
# run is unchanged.

from msr.infra.prefork import ENV as _PREFORK_ENV

SLURM_ENV = {
    "partition": "MSR_SLURM_PARTITION",
    "gpu_partition": "MSR_SLURM_GPU_PARTITION",
    "account": "MSR_SLURM_ACCOUNT",
    "gpu_gres": "MSR_SLURM_GPU_GRES",
}
# Slurm names: letters, digits, '_', '-', '.' (several partitions or accounts: comma-separated)
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
# the plugin's own GRES form: name, name:count or name:type:count (count may end in T, G, M)
_SLURM_GRES = re.compile(r"^[A-Za-z0-9_]+(:[A-Za-z0-9_.]+)?(:\d+[TGM]?)?$")


def _slurm_setting(key, pattern, example):
    var = SLURM_ENV[key]
    value = os.environ.get(var, "").strip()
    if value and not pattern.match(value):
        raise WorkflowError(f"{var}={value!r} is not a valid Slurm {key.replace('_', ' ')} (expected e.g. {example})")
    return value


SLURM = {
    "partition": _slurm_setting("partition", _SLURM_NAME, "gpu or batch"),
    "gpu_partition": _slurm_setting("gpu_partition", _SLURM_NAME, "gpu"),
    "account": _slurm_setting("account", _SLURM_NAME, "myproject"),
    "gpu_gres": _slurm_setting("gpu_gres", _SLURM_GRES, "gpu:1, gpu:a100:1 or shard:1") or "gpu:1",
}


def slurm_resources(gpu=False):
    """The scheduler resources of a job: its partition and account where set, and for a GPU
    train job (``gpu``) the GRES that gets it a GPU. Without a GPU request Slurm hides every GPU
    from the job, so a CUDA run there would fail."""
    partition = (SLURM["gpu_partition"] or SLURM["partition"]) if gpu else SLURM["partition"]
    resources = {}
    if partition:
        resources["slurm_partition"] = partition
    if SLURM["account"]:
        resources["slurm_account"] = SLURM["account"]
    if gpu:
        resources["gres"] = SLURM["gpu_gres"]
    return resources


def train_requests_gpu():
    """A train job asks the scheduler for a GPU when the config trains on CUDA - through GRES,
    unless the config gives an explicit GPU count per job (resources.gpu, sbatch --gpus), which
    the plugin does not accept together with a GPU GRES."""
    return config["train"]["device"] == "cuda" and config["resources"]["gpu"] == 0


# `make run` starts snakemake under `msr prefork --`, a fork server on this host to which every
# `msr train` hands its work (through MSR_PREFORK_SOCKET). A cluster job that did so would train
# here, outside its allocation's CPUs, memory and GPU. So with any executor that runs jobs
# elsewhere, the variable is dropped before the first job is submitted: neither sbatch (which
# exports this environment to the job) nor the jobs see it. The executor is known only once the
# workflow starts (not while this file is read), hence a start hook.
onstart:
    if not workflow.local_exec and os.environ.pop(_PREFORK_ENV, None) is not None:
        print(f"msr: prefork off: jobs run through the {workflow.executor_plugin.name} executor, "
              f"not on this host ({_PREFORK_ENV} dropped)", file=sys.stderr)
