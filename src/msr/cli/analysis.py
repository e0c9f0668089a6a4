"""``msr aggregate``, ``msr manifest``, ``msr verify``, ``msr reproduce`` and ``msr targets``: from run
directories to a citable set, and the checks a reader runs before citing it."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from msr import catalog
from msr.cli.common import fail

# the default config set's folders (workflow/rules/common.smk lays every set out this way)
RESULTS = Path("results") / catalog.DEFAULT_SET
FIGURES = Path("figures") / catalog.DEFAULT_SET


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate", help="collect run directories into tidy tables",
        description="Collect run directories into results tables (runs.csv, summary.csv, curves.csv).")
    p.add_argument("run_dirs", nargs="*", type=Path,
                   help="run directories or their summary.json files; default: every complete run under --runs")
    p.add_argument("--runs", type=Path, default=RESULTS / "runs",
                   help=f"the runs root (run ids are paths below it) [{RESULTS / 'runs'}]")
    p.add_argument("--out", type=Path, default=RESULTS / "tables", help=f"output folder [{RESULTS / 'tables'}]")
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
    p.add_argument("--runs", type=Path, default=RESULTS / "runs",
                   help=f"runs root, used when --runs-table is not given [{RESULTS / 'runs'}]")
    p.add_argument("--config-sha256", default=None, help="hash of the pipeline config")
    p.add_argument("--config-record", type=Path, default=None,
                   help="the resolved pipeline config (JSON/YAML mapping), recorded so that "
                        "`msr verify --config` can compare a config file with it; its hash "
                        "must equal --config-sha256 if both are given")
    p.add_argument("--out", type=Path, default=FIGURES / "MANIFEST.json", help=f"[{FIGURES / 'MANIFEST.json'}]")
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

    p = sub.add_parser(
        "reproduce", help="retrain a sample of a figure set's runs and say whether they reproduce",
        description="Retrain K sampled runs of a published figure set from the configs its manifest records, "
                    "into a scratch folder, and compare each with the published run: bitwise where the machine "
                    "(CPU model, torch, precision, threads) is the same, else within a prediction interval "
                    "from the published seeds that all K faithful runs meet with 95% probability "
                    "(msr.analysis.reproduce). "
                    "Exit 0 only if every run passes.")
    p.add_argument("set", type=Path, help="the set's folder (figures/<set>) or its MANIFEST.json")
    p.add_argument("--runs", dest="k", type=int, default=None, metavar="K",
                   help="how many runs to sample, main-grid runs first (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample [0]")
    p.add_argument("--run", dest="only", action="append", default=[], metavar="RUN_ID",
                   help="reproduce this run instead of a sample (repeatable), e.g. digits/resnet20/bn/base/seed0")
    p.add_argument("--out", type=Path, default=None,
                   help="scratch folder for the retrained runs [a new temporary folder, kept]")
    p.add_argument("--root", type=Path, default=None,
                   help="the project root [default: derived from the manifest's set_dir]")
    p.add_argument("--runs-root", dest="runs_root", type=Path, default=None,
                   help="the published runs root, for manifests before version 3 (which record no run configs)")
    p.add_argument("--data-root", dest="data_root", type=Path, default=None,
                   help="the data folder [default: the recorded one, below the project root]")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="train on this device instead of the recorded one (then no bitwise match is expected)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads instead of the recorded count (then no bitwise match is expected)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto",
                   help="progress bar on a terminal, epoch lines otherwise")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "targets", help="check a study's power and regime targets from its runs.csv",
        description="A study's design targets, after its runs (msr.analysis.power): the paired minimum "
                    "detectable difference at 80%% power (two-sided alpha 0.05) of each comparison, from the "
                    "observed sd of its per-seed differences, and the final clean-train minus test gap of "
                    "each variant. Main-grid runs that trained only. Exit 0 whether or not a target is met.")
    p.add_argument("runs_table", type=Path, help="results/<set>/tables/runs.csv")
    p.add_argument("--pair", dest="pairs", action="append", default=[], metavar="A:B",
                   help="a comparison A - B (repeatable), e.g. msr_noise:msr")
    p.add_argument("--gap", dest="gap_variants", action="append", default=[], metavar="VARIANT",
                   help="a variant whose clean-train minus test gap to check (repeatable)")
    p.add_argument("--mdd-max", type=float, default=0.75, help="the MDD target in pp (default: 0.75)")
    p.add_argument("--gap-min", type=float, default=4.0, help="the gap target in pp (default: 4)")
    p.set_defaults(func=cmd_targets)


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


def cmd_reproduce(args: argparse.Namespace) -> int:
    from msr.analysis import reproduce

    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    try:
        verdicts, out = reproduce.reproduce(
            args.set, k=args.k, seed=args.seed, only=args.only, out=args.out, root=args.root,
            runs_root=args.runs_root, device=args.device, threads=args.threads, data_root=args.data_root,
            progress=progress)
    except reproduce.ReproduceError as err:
        return fail("msr reproduce", str(err))
    print()
    print(reproduce.format_table(verdicts))
    print(reproduce.overall(verdicts))
    print(f"(retrained runs and {reproduce.REPORT} in {out})")
    return 0 if all(v.passed for v in verdicts) else 1


def cmd_targets(args: argparse.Namespace) -> int:
    import pandas as pd

    from msr.analysis import power

    pairs = []
    for text in args.pairs:
        a, sep, b = text.partition(":")
        if not sep or not a or not b:
            return fail("msr targets", f"--pair {text!r}: give two variants as A:B, e.g. msr_noise:msr")
        pairs.append((a, b))
    if not pairs and not args.gap_variants:
        return fail("msr targets", "nothing to check: give --pair A:B and/or --gap VARIANT")
    try:
        runs = pd.read_csv(args.runs_table)
    except (OSError, ValueError) as err:
        return fail("msr targets", f"{args.runs_table}: {err}")
    needed = {"variant", "sweep", "seed", "dataset", "status", "final_test_acc", "final_clean_train_acc"}
    if missing := needed - set(runs.columns):
        return fail("msr targets", f"{args.runs_table}: no column {', '.join(sorted(missing))} (not a runs.csv?)")
    if unknown := sorted(({v for p in pairs for v in p} | set(args.gap_variants)) - set(runs["variant"])):
        return fail("msr targets", f"{args.runs_table}: no runs of {', '.join(unknown)}")
    if pairs:
        table = power.power_rows(runs, pairs, mdd_max=args.mdd_max)
        print(f"paired minimum detectable difference at {power.POWER:.0%} power (two-sided alpha {power.ALPHA:g}):")
        print(table.to_markdown(index=False, floatfmt=".2f"))
    if args.gap_variants:
        table = power.gap_rows(runs, args.gap_variants, gap_min=args.gap_min)
        print("final clean-train minus test accuracy (mean over trained seeds):")
        print(table.to_markdown(index=False, floatfmt=".2f"))
    return 0
