"""``msr plan-runs``, ``msr run-plan``, ``msr pack-runs`` and ``msr import``: training a set's runs
on another machine (a GPU visit) and bringing them back.

    here:    msr plan-runs --out visit/plan.json -- --workflow-profile workflow/profiles/fashion
    there:   python3 -m msr run-plan visit/plan.json --procs 8 --deadline-s 300 --status OUT/status.json
             python3 -m msr pack-runs --status OUT/status.json --out OUT
    here:    msr import OUT/runs-1.tar.gz ...      (then make run: Snakemake trains only the rest)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from msr.cli.common import fail, split_list


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan-runs", help="(visit) the train commands Snakemake would run, in priority order, as a plan file",
        description="Ask Snakemake for its dry run (--dry-run --printshellcmds plus SNAKEMAKE_ARGS) and write "
                    "the exact `msr train` command of every run it would train, priority runs first "
                    "(msr.pipeline.plan), for a machine without Snakemake.",
        usage="msr plan-runs --out PLAN [--priority V,...] [--from DRYRUN] [-- SNAKEMAKE_ARGS ...]")
    p.add_argument("--out", required=True, help="the plan file to write (JSON)")
    p.add_argument("--priority", type=split_list, default=None, help="variants trained first, seed by seed (default bn,msr,msr_noise,bn_noise)")
    p.add_argument("--from", dest="dry_run", help="a saved dry-run output instead of running Snakemake")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="SNAKEMAKE_ARGS")
    p.set_defaults(func=cmd_plan_runs)

    p = sub.add_parser(
        "run-plan", help="(visit) run a plan's train commands with N processes under a deadline",
        description="Run the plan's `msr prepare` steps, then its runs in order, N at a time; at the deadline "
                    "stop the running ones (each keeps its last epoch's checkpoint) and write the status "
                    "(msr.infra.visit).")
    p.add_argument("plan")
    p.add_argument("--procs", type=int, required=True, help="runs at once")
    p.add_argument("--deadline-s", type=float, required=True, help="seconds from now when everything stops")
    p.add_argument("--status", required=True, help="where status.json goes")
    p.add_argument("--threads", type=int, default=None, help="host threads per run (default: the plan's)")
    p.add_argument("--extra", default="", help="options added to every msr train, e.g. '--cuda-graph'")
    p.add_argument("--stack", type=int, default=1, help="train up to K seeds of one run stacked in one process")
    p.add_argument("--min-start-s", type=float, default=30.0, help="start no run with less time left")
    p.add_argument("--grace-s", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL at the deadline")
    p.set_defaults(func=cmd_run_plan)

    p = sub.add_parser(
        "pack-runs", help="(visit) tar the run directories of a run-plan status for msr import",
        description="Pack the runs a status.json lists - finished ones without their checkpoint, stopped ones "
                    "with it - into at most --max-files tarballs of at most --max-mib each (msr.infra.transfer).")
    p.add_argument("--status", required=True)
    p.add_argument("--out", required=True, help="folder for runs-<i>.tar.gz")
    p.add_argument("--root", default=".", help="the repository the run paths are relative to")
    p.add_argument("--max-files", type=int, default=4)
    p.add_argument("--max-mib", type=float, default=14.0)
    p.set_defaults(func=cmd_pack_runs)

    p = sub.add_parser(
        "import", help="put run directories from tarballs (msr pack-runs) into results/<set>/",
        description="Import the runs of TARBALL(s) into the clone at --root, so Snakemake does not train them "
                    "again: paths, file types and sizes are checked, runs are checked before they move into "
                    "place, a run complete here is kept (msr.infra.transfer).")
    p.add_argument("tarballs", nargs="+", metavar="TARBALL")
    p.add_argument("--root", default=".", help="the clone's root (default: here)")
    p.add_argument("--no-data-check", dest="data_check", action="store_false",
                   help="import even though the processed data the runs depend on is missing here")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "visit-report", help="(visit) compare digits CUDA vs CPU, choose the training path, write summary.md",
        description="The reports of tools/gpu_session.sh (msr.infra.visit_report), torch-free.")
    what = p.add_subparsers(dest="report", metavar="REPORT", required=True)
    q = what.add_parser("compare", help="digits test accuracy on CUDA vs CPU, within a tolerance")
    q.add_argument("digits", help="folder with cuda/<variant>/ and cpu/<variant>/ run directories")
    q.add_argument("--variants", type=split_list, required=True)
    q.add_argument("--tolerance", type=float, required=True, help="largest |accuracy difference| accepted")
    q.add_argument("--out", required=True)
    q = what.add_parser("choose", help="the fastest measured training path: prints PROCS STACK EXTRA")
    q.add_argument("bench", nargs="+", help="msr bench --json tables")
    q.add_argument("--variant", default="msr_noise")
    q.add_argument("--out", required=True, help="choice.json")
    q = what.add_parser("summary", help="summary.md of a visit's work folder")
    q.add_argument("work")
    q.add_argument("--mode", required=True, choices=["quick", "train"])
    q.add_argument("--plan", default=None)
    q.add_argument("--out", required=True)
    p.set_defaults(func=cmd_visit_report)


def cmd_plan_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from msr.pipeline import plan

    extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    priority = args.priority or list(plan.PRIORITY)
    try:
        if args.dry_run:
            made = plan.make_plan(Path(args.dry_run).read_text(), extra, priority=priority)
        else:
            made = plan.plan_from_snakemake(extra, priority=priority)
        plan.write_plan(made, args.out)
    except (plan.PlanError, OSError) as err:
        return fail("msr plan-runs", str(err))
    print(f"{args.out}: {len(made['runs'])} run(s) to train, {len(made['prepare'])} data step(s)")
    if made["waiting"]:
        print(f"  {len(made['waiting'])} more run(s) wait for the lr selection (their lr factor is the checkpoint "
              "select_lr's choice): import the validation runs, let Snakemake run select_lr here "
              "(snakemake ... --until select_lr), then plan again")
    return 0


def cmd_run_plan(args: argparse.Namespace) -> int:
    from msr.infra import visit
    from msr.pipeline.plan import PlanError

    try:
        status = visit.run_plan(args.plan, procs=args.procs, deadline_s=args.deadline_s, status_path=args.status,
                                threads=args.threads, extra=shlex.split(args.extra), stack=args.stack,
                                min_start_s=args.min_start_s, grace_s=args.grace_s,
                                log=lambda line: print(line, flush=True))
    except (PlanError, ValueError, OSError) as err:
        return fail("msr run-plan", str(err))
    per_step = status["gpu_seconds_per_step"]
    print(f"[run-plan] {status['runs_finished']} finished, {status['runs_partial']} partial, {status['steps_done']} steps "
          f"in {status['train_wall_s']:.0f}s" + (f" ({1e3 * per_step:.2f} ms of the machine per step)" if per_step else ""))
    return 0 if not any(j["state"] == "failed" for j in status["jobs"]) else 1


def cmd_pack_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from msr.infra import transfer

    try:
        status = json.loads(Path(args.status).read_text())
        runs = [(r["out"], r.get("log")) for r in status.get("runs", [])]
        packed = transfer.pack_runs(args.root, runs, args.out, max_files=args.max_files, max_bytes=int(args.max_mib * transfer.MiB))
    except (OSError, ValueError, KeyError, transfer.TransferError) as err:
        return fail("msr pack-runs", str(err))
    for f in packed.files:
        print(f"{f}: {sum(1 for t in packed.runs.values() if t == f.name)} run(s), {f.stat().st_size / transfer.MiB:.1f} MiB")
    if packed.left_out:
        print(f"left out (over the limits): {', '.join(packed.left_out)}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from msr.infra import transfer
    from msr.training.rundir import RunDirError

    try:
        done = transfer.import_runs(args.tarballs, args.root, data_check=args.data_check)
    except (transfer.TransferError, RunDirError, OSError) as err:
        return fail("msr import", str(err))
    print(transfer.summary_line(done))
    return 0


def cmd_visit_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from msr import atomic
    from msr.infra import visit_report

    if args.report == "compare":
        result = visit_report.compare_digits(args.digits, args.variants, args.tolerance)
        atomic.write_json(Path(args.out), result)
        print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1
    if args.report == "choose":
        choice = visit_report.choose_path([Path(b) for b in args.bench], args.variant)
        atomic.write_json(Path(args.out), choice)
        print(choice["procs"], choice["stack"], choice["extra"])
        return 0
    atomic.write_text(Path(args.out), visit_report.summary(args.work, args.mode, plan=args.plan))
    return 0
