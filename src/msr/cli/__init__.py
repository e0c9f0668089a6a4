"""The ``msr`` command: one parser with every subcommand.

    msr train | variants                      msr.cli.training
    msr prepare | download | datasets         msr.cli.data
    msr aggregate | manifest | verify | reproduce   msr.cli.analysis
    msr bench | comm | prefork | reset-run    msr.cli.tools
    msr plan-runs | run-plan | pack-runs | import   msr.cli.visit (runs trained elsewhere)

Building the parser imports no torch (names come from msr.catalog); a command imports what it
needs when it runs. Bad input ends with one line naming the problem and exit status 2 - no
traceback, nothing written.
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from msr import __version__
from msr.cli import analysis, data, tools, training, visit

GROUPS = (training, data, analysis, tools, visit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msr", description="Mean Shift Rejection replication toolkit")
    parser.add_argument("--version", action="version", version=f"msr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from msr.infra import prefork  # no torch: handing the run to a fork server skips its import

        # a data-parallel rank (torchrun) trains in its own process, never in the fork server
        if os.environ.get(prefork.ENV) and os.environ.get("WORLD_SIZE", "1") == "1":
            code = prefork.delegate(argv)
            if code is not None:
                return code
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.entry = main  # the fork server (msr prefork --serve) runs each job through this same entry
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed reader shows here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe broke (a subprocess, the fork server): a real error
        # The reader of our output went away (`msr verify ... | head -1`): stop quietly, as a shell
        # tool killed by SIGPIPE does. stdout goes to /dev/null so the interpreter's final flush
        # cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE: what the shell reports for a tool SIGPIPE stopped


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reading end is closed (poll reports POLLERR on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (a captured stdout), or not pollable
        return False
