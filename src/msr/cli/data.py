"""``msr prepare``, ``msr download`` and ``msr datasets``: the data a run needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msr import catalog
from msr.cli.common import fail


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for name, helptext, func in [
        ("prepare", "download if needed and build the processed tensor cache", cmd_prepare),
        ("download", "fetch a dataset's raw files into <data-root>/raw/ and verify them", cmd_download),
    ]:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--dataset", required=True, choices=list(catalog.DATASETS))
        p.add_argument("--data-root", dest="data_root", default=catalog.DATA_ROOT, help=f"default: {catalog.DATA_ROOT}")
        p.add_argument("--mirror", default=None, metavar="DIR",
                       help="local folder with the raw files, tried before any download "
                            "(default: the dataset's own, e.g. Debian's for fashion_mnist)")
        if name == "prepare":
            p.add_argument("--image-size", dest="image_size", type=int, default=None)
            p.add_argument("--no-download", dest="download", action="store_false")
        p.set_defaults(func=func)
    p = sub.add_parser("datasets", help="list datasets, where each comes from, and what is on disk")
    p.add_argument("--data-root", dest="data_root", default=catalog.DATA_ROOT, help=f"default: {catalog.DATA_ROOT}")
    p.set_defaults(func=cmd_datasets)


def cmd_prepare(args: argparse.Namespace) -> int:
    from msr import data

    try:
        path = data.prepare(args.dataset, args.data_root, image_size=args.image_size,
                            allow_download=args.download, mirror=args.mirror)
        ds = data.load_dataset(args.dataset, args.data_root, image_size=args.image_size,
                               allow_download=False)  # from the cache just written
    except (data.DatasetError, ValueError) as e:
        return fail("msr prepare", str(e))
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
        return fail("msr download", str(e))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from msr import data

    root = Path(args.data_root)
    cached = sorted(p.name for p in (root / "processed").glob("*.pt")) if (root / "processed").is_dir() else []
    for name, facts in catalog.DATASETS.items():
        mine = [c for c in cached if c == f"{name}.pt" or c.startswith(f"{name}-")]
        sizes = "any" if facts.image_sizes is None else ", ".join(map(str, facts.image_sizes))
        print(f"{name:<14} {facts.train_size} train / {facts.test_size} test, {facts.num_classes} classes, "
              f"{facts.channels}x{facts.image_size}x{facts.image_size} (defaults: {facts.epochs} epochs, "
              f"batch {facts.batch_size}; image sizes: {sizes})")
        print(f"    {'cached: ' + ', '.join(mine) if mine else 'not prepared'}")
        for k, source in enumerate(data.sources(name), start=1):
            print(f"    {k}. {source}")
    return 0
