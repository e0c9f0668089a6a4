"""The runs Snakemake would train, as a file a machine without Snakemake can run (a GPU visit).

Nothing here re-implements the grid: :func:`plan_from_snakemake` asks Snakemake itself for its
dry run with the shell commands (``snakemake --dry-run --printshellcmds <args>``) and keeps,
for every ``train`` job it would run, the exact ``msr train`` options, the run directory and
the log Snakemake gives it. ``prepare`` jobs become the data steps to run first.

A run whose options wait for the lr selection (a tuned variant's main grid and sweeps: the
Snakemake checkpoint ``select_lr`` decides their lr factor, so a dry run before it prints
``<TBD>``) cannot run yet: it is left out of ``runs`` and listed under ``waiting``. Once the
validation runs are back (``msr import``) and ``select_lr`` has run here, a new plan has them.

The jobs are put in priority order, so a visit that runs out of time has the most useful runs:
the lr selection's validation runs first (tag ``val-...``: every tuned run waits for them),
those of the priority variants first; then the runs of the main grid (tag ``base``) of the
priority variants seed by seed (``bn, msr, msr_noise, bn_noise`` of seed 0, then of seed 1,
...: every seed done gives a paired comparison), then the other base runs seed by seed, then
the sweeps.

The plan is JSON (``PLAN_VERSION``)::

    {"version": 1, "snakemake": [...args...], "prepare": [[...msr prepare options...]],
     "runs": [{"out": ..., "log": ..., "wildcards": {...}, "args": [...msr train options...]}],
     "waiting": [...run directories that wait for the lr selection...]}

Torch-free and Snakemake-free to read (:func:`read_plan`): the device runs it with
msr.infra.visit.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from msr import atomic

PLAN_VERSION = 1
PRIORITY = ("bn", "msr", "msr_noise", "bn_noise")
# the shell's words that end the msr command Snakemake's rule runs (redirections, chaining)
_END = {">", ">>", "2>", "2>>", "&>", "2>&1", "&&", "||", ";", "|"}
_RULE = re.compile(r"^(?:local)?rule (\S+):\s*$")
_FIELD = re.compile(r"^\s+(\w+): (.*)$")
# what Snakemake prints for a value that waits for a checkpoint (the lr selection)
PENDING = "<TBD>"
VALIDATION_TAG = "val-"


class PlanError(ValueError):
    """A dry run or plan file that cannot be turned into runs; the message says what and where."""


@dataclass
class PlannedRun:
    out: str  # the run directory (repo-relative, as Snakemake gives it)
    log: str  # Snakemake's log file of the job
    args: list[str]  # the `msr train` options, exactly as the rule's shell command has them
    wildcards: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.wildcards.get("variant", "")

    @property
    def seed(self) -> int:
        return int(self.wildcards.get("seed", 0))

    @property
    def tag(self) -> str:
        return self.wildcards.get("tag", "")


def _msr_args(command: str, subcommand: str) -> list[str] | None:
    """The options after ``msr <subcommand>`` in a shell command, up to a redirection or ``&&``."""
    try:
        words = shlex.split(command)
    except ValueError as err:
        raise PlanError(f"cannot split the shell command ({err}): {command[:200]}") from None
    for i in range(len(words) - 1):
        if PurePosixPath(words[i]).name == "msr" and words[i + 1] == subcommand:
            args = []
            for w in words[i + 2:]:
                if w in _END or w.startswith((">", "2>", "&>")):
                    break
                args.append(w)
            return args
    return None


def _option(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def parse_dry_run(text: str) -> tuple[list[list[str]], list[PlannedRun]]:
    """(prepare options, train runs) of a ``snakemake --dry-run --printshellcmds`` output; runs
    whose options wait for a checkpoint (``<TBD>``) included - :func:`split_waiting` sets them
    apart."""
    jobs: list[dict[str, Any]] = []
    job: dict[str, Any] | None = None
    for line in text.splitlines():
        m = _RULE.match(line)
        if m:
            job = {"rule": m.group(1), "fields": {}}
            jobs.append(job)
            continue
        if job is None:
            continue
        if line.startswith("Shell command:"):
            job["shell"] = line.split(":", 1)[1].strip()
            job = None
            continue
        f = _FIELD.match(line)
        if f and "shell" not in job:
            job["fields"][f.group(1)] = f.group(2).strip()
    prepare, runs = [], []
    for j in jobs:
        if j["rule"] not in ("train", "prepare"):
            continue
        shell = j.get("shell")
        if not shell:
            raise PlanError(f"rule {j['rule']} job {j['fields'].get('output', '?')}: the dry run printed no shell "
                            "command (run it with --printshellcmds)")
        args = _msr_args(shell, j["rule"])
        if args is None:
            raise PlanError(f"rule {j['rule']}: no `msr {j['rule']}` in its shell command: {shell[:200]}")
        if j["rule"] == "prepare":
            prepare.append(args)
            continue
        output = j["fields"].get("output", "")
        out = _option(args, "--out")
        if out is None or str(PurePosixPath(output).parent) != out:
            raise PlanError(f"train job {output!r}: its command writes --out {out!r}, not the output's directory")
        wildcards = dict(kv.split("=", 1) for kv in j["fields"].get("wildcards", "").split(", ") if "=" in kv)
        runs.append(PlannedRun(out=out, log=j["fields"].get("log", ""), args=args, wildcards=wildcards))
    return prepare, runs


def split_waiting(runs: Sequence[PlannedRun]) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """(runs that can train now, runs whose options wait for a checkpoint: ``<TBD>``)."""
    ready = [r for r in runs if not any(PENDING in a for a in r.args)]
    return ready, [r for r in runs if r not in ready]


def order(runs: Sequence[PlannedRun], priority: Sequence[str] = PRIORITY) -> list[PlannedRun]:
    """Validation runs (priority variants first), then the priority variants' base runs seed by
    seed, then the other base runs seed by seed, then the sweeps (each in Snakemake's order
    otherwise)."""
    rank = {v: i for i, v in enumerate(priority)}

    def key(item: tuple[int, PlannedRun]):
        i, run = item
        if run.tag.startswith(VALIDATION_TAG):
            return (0, rank.get(run.variant, len(rank)), 0, 0, i)
        base = run.tag == "base"
        return (1, not base, run.variant not in rank or not base, run.seed if base else 0,
                rank.get(run.variant, len(rank)), i)

    return [run for _, run in sorted(enumerate(runs), key=key)]


def plan_from_snakemake(snakemake_args: Sequence[str], *, priority: Sequence[str] = PRIORITY,
                        snakemake: Sequence[str] | None = None, cwd: str | Path | None = None) -> dict[str, Any]:
    """Ask Snakemake for its dry run with ``snakemake_args`` and make the plan of it."""
    cmd = [*(snakemake or [sys.executable, "-m", "snakemake"]), "--dry-run", "--printshellcmds", *snakemake_args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PlanError(f"the dry run failed ({' '.join(cmd)}): " + " | ".join(tail))
    return make_plan(done.stdout + "\n" + done.stderr, snakemake_args, priority=priority)


def make_plan(dry_run: str, snakemake_args: Sequence[str] = (), *, priority: Sequence[str] = PRIORITY) -> dict[str, Any]:
    prepare, runs = parse_dry_run(dry_run)
    ready, waiting = split_waiting(runs)
    return {"version": PLAN_VERSION, "snakemake": list(snakemake_args), "priority": list(priority),
            "prepare": prepare, "runs": [asdict(r) for r in order(ready, priority)],
            "waiting": [r.out for r in waiting]}


def write_plan(plan: dict[str, Any], path: str | Path) -> None:
    atomic.write_json(Path(path), plan)


def read_plan(path: str | Path) -> tuple[list[list[str]], list[PlannedRun]]:
    """(prepare options, runs in order) of a plan file; errors name the file."""
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file (make one with `msr plan-runs`)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: not a plan file ({err})") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        raise PlanError(f"{path}: not a version-{PLAN_VERSION} plan (made by another msr?)")
    try:
        runs = [PlannedRun(**r) for r in plan["runs"]]
        prepare = [list(map(str, p)) for p in plan["prepare"]]
    except (KeyError, TypeError) as err:
        raise PlanError(f"{path}: damaged plan ({err})") from None
    for r in runs:
        if not isinstance(r.args, list) or not all(isinstance(a, str) for a in r.args) or _option(r.args, "--out") != r.out:
            raise PlanError(f"{path}: run {r.out!r}: its options do not write to its directory")
        if any(PENDING in a for a in r.args):
            raise PlanError(f"{path}: run {r.out!r} waits for the lr selection ({PENDING} in its options): "
                            "make the plan again after select_lr")
    return prepare, runs
