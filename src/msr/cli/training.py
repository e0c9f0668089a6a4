"""``msr train`` (one run into a run directory) and ``msr variants`` (the registry)."""

from __future__ import annotations

import argparse

import yaml

from msr import catalog
from msr.cli.common import fail, load_config_file, parse_override, split_list
from msr.training import config


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = config.defaults()  # the one definition of a run's defaults (torch-free)
    from msr.infra.gpu import DEFAULT_WAIT_S  # torch-free

    p = sub.add_parser(
        "train",
        help="train one run into a run directory",
        description="Train one run. Options override keys of --config; unset options take the defaults "
                    "shown, the dataset's (msr datasets lists them) or the variant's (msr variants).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML/JSON file with any of the options below (keys use underscores)")
    p.add_argument("--out", help="run directory (required); with --seeds a path with {seed} in it")
    p.add_argument("--dataset", help=f"one of {', '.join(catalog.DATASETS)} (default {d['dataset']})")
    p.add_argument("--arch", help=f"resnetN with N = 6n+2 (default {d['arch']})")
    p.add_argument("--variant", help=f"one of {', '.join(catalog.VARIANTS)} (default {d['variant']})")
    p.add_argument("--epochs", type=int, help="default: the dataset's (msr datasets lists them)")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--seeds", type=split_list, metavar="LIST",
                   help="several seeds of the same run, e.g. 0,1,2, each into --out with {seed} replaced")
    p.add_argument("--stacked", action="store_true",
                   help="with --seeds: train them stacked in one process (torch.func; msr.training.stacked_loop)")
    p.add_argument("--lr", type=float, help="base (conv-group) lr; other groups keep their ratio (default: the variant's)")
    p.add_argument("--lr-factor", dest="lr_factor", type=float, metavar="F",
                   help="every param group at F x the variant's own lr (default: 1, the variant's own; not with --lr)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: the dataset's (msr datasets lists them)")
    p.add_argument("--noise-delta", dest="noise_delta", type=float,
                   help="noise magnitude d (turns noise on for any variant; default: the variant's)")
    p.add_argument("--data-root", dest="data_root", help=f"default {d['data_root']}")
    p.add_argument("--image-size", dest="image_size", type=int,
                   help="one of the dataset's image sizes (default: its own; msr datasets lists them)")
    p.add_argument("--train-subset", dest="train_subset", type=int, metavar="N",
                   help="train on a fixed class-stratified subset of N training images, from 1 to the "
                        "training set's size (the test set stays whole; default: all)")
    p.add_argument("--eval-split", dest="eval_split", choices=list(config.EVAL_SPLITS),
                   help=f"evaluate on the test set (default {d['eval_split']}) or on --validation-size training "
                        "images held out (class-stratified, from outside --train-subset), for choosing an lr")
    p.add_argument("--validation-size", dest="validation_size", type=int, metavar="N",
                   help="training images held out with --eval-split validation (default: none; needed there)")
    p.add_argument("--device", choices=config.DEVICES, help=f"default {d['device']}")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    p.add_argument("--precision", choices=config.PRECISIONS,
                   help=f"autocast precision (default {d['precision']}: bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on CUDA)")
    p.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                   help="capture the whole step as one CUDA graph (CUDA; bf16/fp32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--probe-every", dest="probe_every", type=int, help=f"steps between probes (default {d['probe_every']})")
    p.add_argument("--eval-every", dest="eval_every", type=int, metavar="E",
                   help="evaluate the test set and the clean train subset every E epochs and after the last "
                        "(default: every epoch; skipped epochs record NaN)")
    p.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="data-parallel BatchNorm variants: normalize each process's shard with its own statistics "
                   "(default: SyncBN, the global batch's - the single-process run's algorithm). "
                   "Data-parallel: launch with torchrun (README, 'Data-parallel training')")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="set a variant field, e.g. lam=0.5 (repeatable)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto", help="progress bar on a terminal, epoch lines otherwise")
    p.add_argument(
        "--gpu-slots", dest="gpu_slots", type=int, default=0, metavar="K",
        help="runs per GPU: claim a free (GPU id, slot < K) pair before CUDA starts and hold it until exit "
        "(ids: $MSR_GPU_IDS, default every visible GPU; locks: $MSR_GPU_LOCK_DIR). 0 = off (default); "
        "ignored with --device cpu (see msr.infra.gpu)",
    )
    p.add_argument(
        "--gpu-wait", dest="gpu_wait", metavar="S",
        help="with --gpu-slots: wait at most S seconds for a free slot, then fail naming the holders "
        f"(default: $MSR_GPU_WAIT_S, else {DEFAULT_WAIT_S:g}; inf = no deadline)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("variants", help="list the registered variants")
    p.set_defaults(func=cmd_variants)


def cmd_train(args: argparse.Namespace) -> int:
    from msr.data import DatasetError
    from msr.training import distributed
    from msr.training.config import ConfigError, RunConfig
    from msr.training.loop import train
    from msr.training.rundir import RunDirError

    opts = vars(args).copy()
    for key in ("command", "func", "entry"):
        opts.pop(key, None)
    progress = {"auto": None, "bar": True, "lines": False}[opts.pop("progress")]
    gpu_slots = opts.pop("gpu_slots")
    gpu_wait = opts.pop("gpu_wait", None)
    sync_bn = opts.pop("sync_bn", None)
    joined = False
    seeds, stacked = opts.pop("seeds", None), opts.pop("stacked", False)
    try:
        # torchrun's environment (WORLD_SIZE > 1) makes this one rank of a data-parallel run
        dist = distributed.from_env(sync_bn=sync_bn is not False)
        if dist is None and sync_bn is False:
            raise ValueError("--no-sync-bn applies to a data-parallel run (torchrun with more than one process)")
        if dist is not None and gpu_slots:
            raise ValueError("--gpu-slots does not combine with torchrun: a data-parallel rank uses GPU LOCAL_RANK")
        values = load_config_file(opts.pop("config")) if "config" in opts else {}
        out = opts.pop("out", None) or values.pop("out", None)
        if not out:
            raise ValueError("--out is required (the run directory)")
        values.pop("out", None)
        overrides = dict(values.get("overrides") or {})
        overrides.update(parse_override(o) for o in opts.pop("override", []))
        values.update(opts)
        if overrides:
            values["overrides"] = overrides
        runs = _seed_runs(values, str(out), seeds, stacked)
        if gpu_slots:  # before RunConfig: validating device='cuda' would start CUDA on every GPU
            from msr.infra.gpu import claim_for_run

            claim_for_run(gpu_slots, str(values.get("device", "auto")), wait_s=gpu_wait)
        cfgs = [RunConfig.from_dict(v) for v, _ in runs]
        if dist is not None:
            if len(runs) > 1:
                raise ValueError("--seeds does not combine with torchrun: a data-parallel run is one seed")
            distributed.init_process_group(dist, cfgs[0].resolved_device().type)
            joined = True
        if stacked:
            from msr.training.stacked_loop import train_stacked

            summaries = train_stacked(cfgs, [o for _, o in runs], progress=progress)
        else:  # ranks > 0 of a data-parallel run are quiet
            summaries = [train(cfg, o, progress=progress, dist=dist) for cfg, (_, o) in zip(cfgs, runs, strict=True)]
    except (ConfigError, RunDirError, DatasetError, distributed.DistributedError, OSError, ValueError, yaml.YAMLError) as e:
        # RunDirError: a damaged / locked run directory or a full disk, already one line that
        # names the file and what to do
        return fail("msr train", str(e))
    finally:
        if joined:
            distributed.leave()
    return 0 if all(s["status"] in ("completed", "diverged") for s in summaries) else 1

def _seed_runs(values: dict, out: str, seeds: list[str] | None, stacked: bool) -> list[tuple[dict, str]]:
    """(config values, run directory) of each run the command asks for: one, or one per seed."""
    if seeds is None:
        if stacked:
            raise ValueError("--stacked trains several seeds: give them with --seeds, e.g. --seeds 0,1,2")
        if "{seed}" in out:
            raise ValueError("--out has {seed} in it: give the seeds with --seeds (or write the path out)")
        return [(values, out)]
    if "seed" in values:
        raise ValueError("give either --seed or --seeds, not both")
    try:
        numbers = [int(s) for s in seeds]
    except ValueError:
        raise ValueError(f"--seeds {','.join(seeds)}: seeds are integers, e.g. --seeds 0,1,2") from None
    if not numbers or len(set(numbers)) != len(numbers):
        raise ValueError(f"--seeds {','.join(seeds)}: give each seed once")
    if "{seed}" not in out:
        raise ValueError("--out needs {seed} in it with --seeds (one run directory per seed), e.g. runs/msr/seed{seed}")
    return [({**values, "seed": n}, out.replace("{seed}", str(n))) for n in numbers]


def cmd_variants(args: argparse.Namespace) -> int:
    from msr.core.variants import VARIANTS

    for spec in VARIANTS.values():
        print(f"{spec.name:<10} claim {spec.claim:<9} {spec.description}")
    return 0
