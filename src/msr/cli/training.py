"""``msr train`` (one run into a run directory) and ``msr variants`` (the registry)."""

from __future__ import annotations

import argparse

import yaml

from msr import catalog
from msr.cli.common import fail, load_config_file, parse_override


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one run into a run directory",
        description="Train one run. Options override keys of --config; unset options take the variant's defaults.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML/JSON file with any of the options below (keys use underscores)")
    p.add_argument("--out", help="run directory (required)")
    p.add_argument("--dataset", help=f"one of {', '.join(catalog.DATASETS)} (default digits)")
    p.add_argument("--arch", help="resnetN with N = 6n+2 (default resnet20)")
    p.add_argument("--variant", help=f"one of {', '.join(catalog.VARIANTS)} (default msr)")
    p.add_argument("--epochs", type=int, help="default: the dataset's (msr datasets lists them)")
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float, help="base (conv-group) lr; other groups keep their ratio")
    p.add_argument("--lr-factor", dest="lr_factor", type=float, metavar="F",
                   help="every param group at F x the variant's own lr (1 = its default; not with --lr)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: the dataset's (msr datasets lists them)")
    p.add_argument("--noise-delta", dest="noise_delta", type=float, help="noise magnitude d (turns noise on for any variant)")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--image-size", dest="image_size", type=int, help="digits: 8, 16 (default) or 32")
    p.add_argument("--train-subset", dest="train_subset", type=int, metavar="N",
                   help="train on a fixed class-stratified subset of N training images (the test set stays whole)")
    p.add_argument("--eval-split", dest="eval_split", choices=["test", "validation"],
                   help="evaluate on the test set (default) or on --validation-size training images held "
                        "out (class-stratified, from outside --train-subset), for choosing an lr")
    p.add_argument("--validation-size", dest="validation_size", type=int, metavar="N",
                   help="training images held out with --eval-split validation")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on CUDA)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--probe-every", dest="probe_every", type=int, help="steps between probes")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="set a variant field, e.g. lam=0.5 (repeatable)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto", help="progress bar on a terminal, epoch lines otherwise")
    p.add_argument(
        "--gpu-slots", dest="gpu_slots", type=int, default=0, metavar="K",
        help="runs per GPU: claim a free (GPU id, slot < K) pair before CUDA starts and hold it until exit "
        "(ids: $MSR_GPU_IDS, default every visible GPU; locks: $MSR_GPU_LOCK_DIR). 0 = off (default); "
        "ignored with --device cpu (see msr.infra.gpu)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("variants", help="list the registered variants")
    p.set_defaults(func=cmd_variants)


def cmd_train(args: argparse.Namespace) -> int:
    from msr.data import DatasetError
    from msr.training.config import ConfigError, RunConfig
    from msr.training.loop import train
    from msr.training.rundir import RunDirError

    opts = vars(args).copy()
    for key in ("command", "func", "entry"):
        opts.pop(key, None)
    progress = {"auto": None, "bar": True, "lines": False}[opts.pop("progress")]
    gpu_slots = opts.pop("gpu_slots")
    try:
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
        if gpu_slots:  # before RunConfig: validating device='cuda' would start CUDA on every GPU
            from msr.infra.gpu import claim_for_run

            claim_for_run(gpu_slots, str(values.get("device", "auto")))
        cfg = RunConfig.from_dict(values)
        summary = train(cfg, out, progress=progress)
    except (ConfigError, RunDirError, DatasetError, OSError, ValueError, yaml.YAMLError) as e:
        # RunDirError: a damaged / locked run directory or a full disk, already one line that
        # names the file and what to do
        return fail("msr train", str(e))
    return 0 if summary["status"] in ("completed", "diverged") else 1


def cmd_variants(args: argparse.Namespace) -> int:
    from msr.core.variants import VARIANTS

    for spec in VARIANTS.values():
        print(f"{spec.name:<10} claim {spec.claim:<9} {spec.description}")
    return 0
