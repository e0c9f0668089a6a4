"""``msr aggregate``, ``msr manifest`` and ``msr verify``: from run directories to a citable set."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from msr.cli.common import fail


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate", help="collect run directories into tidy tables",
        description="Collect run directories into results tables (runs.csv, summary.csv, curves.csv).")
    p.add_argument("run_dirs", nargs="*", type=Path,
                   help="run directories or their summary.json files; default: every complete run under --runs")
    p.add_argument("--runs", type=Path, default=Path("results/runs"),
                   help="the runs root (run ids are paths below it) [results/runs]")
    p.add_argument("--out", type=Path, default=Path("results/tables"), help="output folder [results/tables]")
    p.add_argument("--lr-selection", type=Path, default=None,
                   help="the lr selection's record (results/<set>/lr_selection.json): runs.csv gets the "
                        "factor chosen for each run's variant (lr_selected_factor)")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser(
        "manifest", help="write figures/<set>/MANIFEST.json",
        description="Write figures/<set>/MANIFEST.json from the provenance records the notebooks left.")
    p.add_argument("--provenance", nargs="+", required=True, type=Path,
                   help="provenance records (results/<set>/provenance/<name>.json)")
    p.add_argument("--runs-table", type=Path, default=None,
                   help="results/<set>/tables/runs.csv, to find each run's directory")
    p.add_argument("--runs", type=Path, default=Path("results/runs"),
                   help="runs root, used when --runs-table is not given [results/runs]")
    p.add_argument("--config-sha256", default=None, help="hash of the pipeline config")
    p.add_argument("--config-record", type=Path, default=None,
                   help="the resolved pipeline config (JSON/YAML mapping), recorded so that "
                        "`msr verify --config` can compare a config file with it; its hash "
                        "must equal --config-sha256 if both are given")
    p.add_argument("--out", type=Path, default=Path("figures/MANIFEST.json"))
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "verify", help="check a figure set against its MANIFEST.json (hashes, runs, config)",
        description="Check a figure set against its MANIFEST.json: file hashes, the runs and tables "
                    "it was made from, the config. Prints OK or what differs; exit 0 / 1.")
    p.add_argument("set", type=Path, help="the set's folder (figures/<set>) or its MANIFEST.json")
    p.add_argument("--config", type=Path, default=None,
                   help="a config file to compare with the config the set was made with "
                        "[default: workflow/config/*.yaml with the set's name, if any]")
    p.add_argument("--runs", type=Path, default=None,
                   help="the runs root, if the run directories are not where the manifest says")
    p.add_argument("--root", type=Path, default=None,
                   help="the project root [default: derived from the manifest's set_dir]")
    p.set_defaults(func=cmd_verify)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from msr.analysis import aggregate
    from msr.training.rundir import RunDirError

    run_dirs = [aggregate.run_dir_of(p) for p in args.run_dirs] or aggregate.find_run_dirs(args.runs)
    missing = [d for d in run_dirs if not (d / "summary.json").exists()]
    if missing:
        print(f"msr aggregate: no summary.json in {', '.join(map(str, missing[:5]))}"
              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""), file=sys.stderr)
        return 2
    try:
        paths = aggregate.aggregate(run_dirs, args.out, args.runs, lr_selection=args.lr_selection)
    except (RunDirError, ValueError, OSError) as err:
        return fail("msr aggregate", str(err))
    print(f"aggregated {len(run_dirs)} run(s) into {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    import yaml

    from msr.analysis import manifest

    run_dirs = None
    if args.runs_table is not None:
        with args.runs_table.open() as f:
            run_dirs = {row["run_id"]: row["run_dir"] for row in csv.DictReader(f)}
    try:
        config = None
        if args.config_record is not None:
            config = manifest.load_config_file(args.config_record)
            if not isinstance(config, dict):
                raise ValueError(f"{args.config_record}: expected a mapping of config keys")
        record = manifest.build_manifest(args.provenance, args.runs, run_dirs, args.config_sha256,
                                         out=args.out, config=config)
        manifest.write_manifest(record, args.out)  # a full disk: msr.atomic.NoSpaceError, one line
    except (OSError, KeyError, ValueError, yaml.YAMLError) as err:
        return fail("msr manifest", str(err))
    print(f"wrote {args.out} ({len(record['items'])} items)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from msr.analysis.verify import verify

    try:
        report = verify(args.set, root=args.root, runs=args.runs, config=args.config)
    except ValueError as err:
        return fail("msr verify", str(err))
    checked = ", ".join(report.checked)
    if report.differences:
        print(f"{args.set}: {len(report.differences)} difference(s) from its manifest (checked {checked})")
        for line in report.differences:
            print(f"  {line}")
    else:
        print(f"{args.set}: OK ({checked} match the manifest)")
    for line in report.notes:
        print(f"  note: {line}")
    return 1 if report.differences else 0
