"""``msr bench``, ``msr comm``, ``msr prefork`` and ``msr reset-run``: tools around training."""

from __future__ import annotations

import argparse
import json
import sys

from msr import catalog
from msr.cli.common import split_list

# the bench's methods, listed here without importing torch (msr.infra.bench.METHODS; a test
# checks the two agree)
BENCH_METHODS = ("eager", "compile", "compile_cudagraphs", "cuda_graph", "processes", "processes_graph", "stacked", "stacked_graph")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_bench(sub)
    _add_comm(sub)

    p = sub.add_parser(
        "prefork", help="run a command (snakemake) whose `msr train` jobs skip torch's import",
        description="Run COMMAND with a fork server that starts every `msr train` inside it "
                    "without re-importing torch (about 2.7 s of CPU saved per run).",
        usage="msr prefork [--socket-dir DIR] -- COMMAND [ARG ...]",
    )
    p.add_argument("--socket-dir", help="where the server's socket lives (default: the system temp dir)")
    p.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)  # internal: the server itself
    p.add_argument("prefork_command", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(func=cmd_prefork)

    p = sub.add_parser(
        "reset-run", help="(pipeline) clear a run directory trained with other options, before its train job",
        description="Used by the train rule before `msr train`: if RUN_DIR's config.json records other "
                    "options than EXPECTED, delete the directory so the run starts over "
                    "(msr.pipeline.grid.reset). Nothing to do for a fresh or matching directory.")
    p.add_argument("run_dir")
    p.add_argument("expected", help="the options as JSON (msr.pipeline.grid.expected_record)")
    p.set_defaults(func=cmd_reset_run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="compare training-step speed: eager, compile, CUDA graph, K processes, K stacked seeds",
        description="Training-step throughput, measured (msr.infra.bench has the details): one table per "
                    "arch x variant of the same step run eagerly, compiled, as a CUDA graph, as K "
                    "processes and as K stacked seeds; or, with --data-path, msr's loader against a "
                    "conventional DataLoader.")
    p.add_argument("--arch", type=split_list, default="resnet20",
                   help="comma-separated, e.g. resnet20,resnet56,resnet110 (--data-path: one)")
    p.add_argument("--variant", type=split_list, default=None,
                   help=f"comma-separated (default bn,msr_noise; --data-path: one, default msr_noise); of {', '.join(catalog.VARIANTS)}")
    p.add_argument("--methods", type=split_list, default=",".join(BENCH_METHODS),
                   help=f"comma-separated subset of {', '.join(BENCH_METHODS)} (default: all)")
    p.add_argument("--k", type=int, default=None, help="models for 'processes' and 'stacked*' (default 4; on a CPU at most its cores)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-shape", default="3,32,32", metavar="C,H,W",
                   help="synthetic images of the table (default 3,32,32: CIFAR; 1,28,28: Fashion-MNIST)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    p.add_argument("--n-train", type=int, default=5000, help="synthetic training images (per model)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the 'compile' row on a CPU too (20-40 s per model)")
    p.add_argument("--stacked-noise", default="per_model", choices=["per_model", "shared"],
                   help="noise RNG of the stacked models (msr.training.stacked)")
    p.add_argument("--worker-timeout", type=float, default=600.0, help="seconds the K processes may take in all")
    p.add_argument("--json", "--out", dest="json", help="also write the result as JSON here")
    g = p.add_argument_group("data-path report (--data-path)")
    g.add_argument("--data-path", action="store_true", help="the data-path report instead of the table")
    g.add_argument("--dataset", default="synthetic", help="synthetic (CIFAR-shaped, default), digits, cifar10, cifar100")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--data-root", default=catalog.DATA_ROOT, help=f"default: {catalog.DATA_ROOT}")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional loop")
    g.add_argument("--no-conventional", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one of the K processes
    p.set_defaults(func=cmd_bench)


def _add_comm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "comm", help="measure what a data-parallel training step communicates: bn + SyncBN vs msr",
        description="Collectives, bytes and step time per data-parallel training step (msr.infra.comm): "
                    "P processes (gloo on CPU, NCCL with one GPU each) run msr train's step - DDP, SyncBN "
                    "for BatchNorm - on synthetic CIFAR-shaped batches; one process at the same global batch "
                    "for reference. Writes comm.csv, comm.md and comm.json to --out.")
    p.add_argument("--variant", type=split_list, default="bn,msr",
                   help=f"comma-separated (default bn,msr); of {', '.join(catalog.VARIANTS)}")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch (default 128)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="cpu: gloo (default); cuda: NCCL, one GPU per process")
    p.add_argument("--threads", type=int, default=None, help="torch threads in all, split between the processes (default: the cores)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="results/comm", help="folder for comm.csv / comm.md / comm.json (default results/comm)")
    p.set_defaults(func=cmd_comm)


def cmd_comm(args: argparse.Namespace) -> int:
    from msr.infra import comm

    unknown = [v for v in args.variant if v not in catalog.VARIANTS]
    if unknown:
        print(f"msr comm: error: unknown variant(s) {unknown}; valid: {', '.join(catalog.VARIANTS)}", file=sys.stderr)
        return 2
    try:
        return comm.run(args)
    except ValueError as err:
        print(f"msr comm: error: {err}", file=sys.stderr)
        return 2


def cmd_bench(args: argparse.Namespace) -> int:
    from msr.infra import bench

    return bench.run(args)


def cmd_prefork(args: argparse.Namespace) -> int:
    from msr.infra import prefork

    if args.serve:
        prefork.serve(args.serve, job=args.entry)
        return 0
    command = args.prefork_command
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        print("msr prefork: error: no COMMAND given (e.g. msr prefork -- snakemake --cores all)", file=sys.stderr)
        return 2
    return prefork.run_with_server(command, args.socket_dir)


def cmd_reset_run(args: argparse.Namespace) -> int:
    from msr.pipeline import grid
    from msr.training.rundir import RunDirError

    try:
        grid.reset(args.run_dir, json.loads(args.expected))
    except (grid.GridError, RunDirError, OSError, ValueError) as err:
        print(f"msr reset-run: {err}", file=sys.stderr)
        return 1
    return 0
