"""Remove a Snakemake lock left by a killed run - and only then (`make run` calls this first).

A Snakemake process that dies without cleaning up (kill -9, a lost terminal, a node crash)
leaves its locks in .snakemake/locks/, and every later run stops with "Directory cannot be
locked" until someone runs `snakemake --unlock`. That command removes the locks
unconditionally, also those of a Snakemake still running here, which would let two of them
write the same files. So this script removes them only when no process whose working
directory is this folder mentions Snakemake on its command line (Snakemake itself, `python -m
snakemake`, and its notebook/script jobs under .snakemake/). If one is alive, the locks stay
and the next Snakemake says the directory is locked, as it should.

Usage: python workflow/scripts/unlock_stale.py [DIR]   (default: the current directory)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil  # a dependency of Snakemake itself


def snakemake_processes(workdir: Path) -> list[psutil.Process]:
    """Live processes (not this one) working in ``workdir`` whose command line mentions snakemake."""
    here = os.path.realpath(workdir)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmdline, cwd = proc.info["cmdline"] or [], proc.info["cwd"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cwd and os.path.realpath(cwd) == here and any("snakemake" in part for part in cmdline):
            found.append(proc)
    return found


def main(argv: list[str]) -> int:
    workdir = Path(argv[0] if argv else ".")
    locks = sorted((workdir / ".snakemake" / "locks").glob("*"))
    if not locks:
        return 0
    alive = snakemake_processes(workdir)
    if alive:
        pids = ", ".join(str(p.pid) for p in alive)
        print(f"unlock_stale: Snakemake is still running in {workdir.resolve()} (pid {pids}); "
              "leaving its lock", file=sys.stderr)
        return 0
    for lock in locks:
        lock.unlink(missing_ok=True)
    print(f"unlock_stale: removed the lock of a Snakemake run that was killed ({len(locks)} file(s) "
          "in .snakemake/locks); no Snakemake process is running here", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
