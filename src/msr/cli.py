"""The ``msr`` command: train, prepare/download data, list things, aggregate, benchmark.

Bad input ends with one line naming the problem and exit status 2 - no traceback, nothing
written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = p.read_text()
    try:
        values = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:  # the parsers' own texts name no file
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ValueError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--override expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


# --------------------------------------------------------------------------- train
def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from msr.core.variants import VARIANTS
    from msr.data import DATASETS

    p = sub.add_parser(
        "train",
        help="train one run into a run directory",
        description="Train one run. Options override keys of --config; unset options take the variant's defaults.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML/JSON file with any of the options below (keys use underscores)")
    p.add_argument("--out", help="run directory (required)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default digits)")
    p.add_argument("--arch", help="resnetN with N = 6n+2 (default resnet20)")
    p.add_argument("--variant", help=f"one of {', '.join(VARIANTS)} (default msr)")
    p.add_argument("--epochs", type=int, help="default: 10 on digits/synthetic, 200 on CIFAR (the paper)")
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float, help="base (conv-group) lr; other groups keep their ratio")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: 32 on digits/synthetic, 128 on CIFAR")
    p.add_argument("--noise-delta", dest="noise_delta", type=float, help="noise magnitude d (turns noise on for any variant)")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--image-size", dest="image_size", type=int, help="digits: 8, 16 (default) or 32")
    p.add_argument("--train-subset", dest="train_subset", type=int, metavar="N",
                   help="train on a fixed class-stratified subset of N training images (the test set stays whole)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads (default: the cores this process may use)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on CUDA)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--probe-every", dest="probe_every", type=int, help="steps between probes (default 50)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="set a variant field, e.g. lam=0.5 (repeatable)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto", help="progress bar on a terminal, epoch lines otherwise")
    p.add_argument(
        "--gpu-slots", dest="gpu_slots", type=int, default=0, metavar="K",
        help="runs per GPU: claim a free (GPU id, slot < K) pair before CUDA starts and hold it until exit "
        "(ids: $MSR_GPU_IDS, default every visible GPU; locks: $MSR_GPU_LOCK_DIR). 0 = off (default); "
        "ignored with --device cpu (see msr.infra.gpu)",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from msr.data import DatasetError
    from msr.training import loop as msr_train

    opts = vars(args).copy()
    for key in ("command", "func"):
        opts.pop(key, None)
    progress = {"auto": None, "bar": True, "lines": False}[opts.pop("progress")]
    gpu_slots = opts.pop("gpu_slots")
    try:
        values = _load_config_file(opts.pop("config")) if "config" in opts else {}
        out = opts.pop("out", None) or values.pop("out", None)
        if not out:
            raise ValueError("--out is required (the run directory)")
        values.pop("out", None)
        overrides = dict(values.get("overrides") or {})
        overrides.update(_parse_override(o) for o in opts.pop("override", []))
        values.update(opts)
        if overrides:
            values["overrides"] = overrides
        if gpu_slots:  # before RunConfig: validating device='cuda' would start CUDA on every GPU
            from msr.infra.gpu import claim_for_run

            claim_for_run(gpu_slots, str(values.get("device", "auto")))
        cfg = msr_train.RunConfig.from_dict(values)
        summary = msr_train.train(cfg, out, progress=progress)
    except (msr_train.ConfigError, msr_train.RunDirError, DatasetError, OSError, ValueError, yaml.YAMLError) as e:
        # RunDirError: a damaged / locked run directory or a full disk, already one line that
        # names the file and what to do
        return _fail("msr train", str(e))
    return 0 if summary["status"] in ("completed", "diverged") else 1


# --------------------------------------------------------------------------- data
def add_data_parsers(sub: argparse._SubParsersAction) -> None:
    from msr.data import DATASETS

    for name, helptext, func in [
        ("prepare", "download if needed and build the processed tensor cache", cmd_prepare),
        ("download", "fetch a dataset's raw files into <data-root>/raw/ and verify them", cmd_download),
    ]:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--dataset", required=True, choices=DATASETS)
        p.add_argument("--data-root", dest="data_root", default="data")
        p.add_argument("--mirror", default=None, metavar="DIR",
                       help="local folder with the raw files, tried before any download "
                            "(default: the dataset's own, e.g. Debian's for fashion_mnist)")
        if name == "prepare":
            p.add_argument("--image-size", dest="image_size", type=int, default=None)
            p.add_argument("--no-download", dest="download", action="store_false")
        p.set_defaults(func=func)
    p = sub.add_parser("datasets", help="list datasets, where each comes from, and what is on disk")
    p.add_argument("--data-root", dest="data_root", default="data")
    p.set_defaults(func=cmd_datasets)


def cmd_prepare(args: argparse.Namespace) -> int:
    from msr import data

    try:
        path = data.prepare(args.dataset, args.data_root, image_size=args.image_size,
                            allow_download=args.download, mirror=args.mirror)
        ds = data.load_dataset(args.dataset, args.data_root, image_size=args.image_size,
                               allow_download=False)  # from the cache just written
    except (data.DatasetError, ValueError) as e:
        return _fail("msr prepare", str(e))
    # what was prepared on stderr; stdout stays the cache path alone, for scripts
    shape = "x".join(str(d) for d in ds.train_x.shape[1:])
    print(f"{ds.name}: {len(ds.train_x)} train / {len(ds.test_x)} test images, {shape}, "
          f"{ds.num_classes} classes", file=sys.stderr)
    for file, facts in (ds.provenance or {}).get("files", {}).items():
        print(f"  {file}: {facts['bytes']} bytes, content md5 {facts['md5']} verified "
              f"(from {facts['from']})", file=sys.stderr)
    print(path)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from msr import data

    try:
        data.download(args.dataset, args.data_root, mirror=args.mirror)
    except (data.DatasetError, ValueError) as e:
        return _fail("msr download", str(e))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from msr import data

    root = Path(args.data_root)
    cached = sorted(p.name for p in (root / "processed").glob("*.pt")) if (root / "processed").is_dir() else []
    for name in data.DATASETS:
        mine = [c for c in cached if c == f"{name}.pt" or c.startswith(f"{name}-")]
        print(f"{name:<10} {'cached: ' + ', '.join(mine) if mine else 'not prepared'}")
        for k, source in enumerate(data.sources(name), start=1):
            print(f"    {k}. {source}")
    return 0


# --------------------------------------------------------------------------- registry
def cmd_variants(args: argparse.Namespace) -> int:
    from msr.core.variants import VARIANTS

    for spec in VARIANTS.values():
        print(f"{spec.name:<10} claim {spec.claim:<9} {spec.description}")
    return 0


# --------------------------------------------------------------------------- forwarded commands
FORWARDED = {
    "aggregate": ("msr.analysis.aggregate", "collect run directories into tidy tables"),
    "manifest": ("msr.analysis.manifest", "write figures/<set>/MANIFEST.json"),
    "verify": ("msr.analysis.verify", "check a figure set against its MANIFEST.json (hashes, runs, config)"),
    "bench": ("msr.infra.bench", "compare training-step speed: eager, compile, CUDA graph, K processes, K stacked seeds"),
    "prefork": ("msr.infra.prefork", "run a command (snakemake) whose `msr train` jobs skip torch's import"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"] and os.environ.get("MSR_PREFORK_SOCKET"):
        from msr.infra.prefork import delegate  # before anything imports torch: that is the point

        code = delegate(argv)
        if code is not None:
            return code
    if argv and argv[0] in FORWARDED:
        import importlib

        module = importlib.import_module(FORWARDED[argv[0]][0])
        return module.main(argv[1:])

    parser = argparse.ArgumentParser(prog="msr", description="Mean Shift Rejection replication toolkit")
    from msr import __version__

    parser.add_argument("--version", action="version", version=f"msr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_data_parsers(sub)
    p = sub.add_parser("variants", help="list the registered variants")
    p.set_defaults(func=cmd_variants)
    for name, (_, helptext) in FORWARDED.items():
        sub.add_parser(name, help=helptext, add_help=False)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
