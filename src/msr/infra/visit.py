"""Run a plan of ``msr train`` commands (msr.pipeline.plan) with N processes under one deadline:
the training half of a GPU visit (tools/gpu_session.sh), on a machine without Snakemake.

- First the plan's data steps (``msr prepare``), one by one, so N runs do not each build the
  processed cache at once.
- Then the runs, in the plan's order (priority first), at most N at a time. Each is the exact
  ``msr train`` command Snakemake would run, with three changes that do not change its results:
  ``--threads`` (the host threads of this machine's share), ``--gpu-slots 0`` (this runner decides
  how many share the GPU), ``--progress lines``; plus ``extra`` options (e.g. ``--cuda-graph``, a
  faster exact path). ``stack=K`` trains K seeds of one run stacked in one process
  (``msr train --seeds ... --stacked``) when their commands differ only in seed and directory.
  A run whose directory is already complete is skipped.
- At the deadline (or when this process gets SIGTERM) every running ``msr train`` gets SIGTERM,
  then SIGKILL after ``grace_s``. A stopped run keeps its last epoch's checkpoint (msr train
  writes one atomically after every epoch) and resumes from it on the next visit or here.
- ``status.json`` (written atomically after every change) records every job (its command, exit
  code, start, end, wall seconds) and every run (completed / diverged / partial after E epochs /
  not started / failed, its steps and train seconds), and the phase's totals: wall seconds,
  steps done, and so the GPU-seconds one training step costs at this concurrency - the number
  a grid's GPU-hours follow from (:func:`gpu_hours`).

Processes are started and signalled by their own pids only (each in its own session), never by
name. Torch-free: the runner only starts processes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msr import atomic
from msr.pipeline.plan import PlannedRun, _option, read_plan

STATUS_VERSION = 1
# options of a planned command that say how to run it, not what it computes: the runner sets them
_RUNNER_OPTIONS = {"--threads": 1, "--gpu-slots": 1, "--progress": 1}


@dataclass
class Job:
    """One process: a run, or K seeds of one run stacked."""

    runs: list[PlannedRun]
    argv: list[str]  # msr's arguments: ["train", ...]
    log: str
    state: str = "queued"  # queued | running | finished | stopped | failed | skipped | not_started
    rc: int | None = None
    start_s: float | None = None  # seconds after the visit's training phase began
    end_s: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        wall = None if self.start_s is None or self.end_s is None else round(self.end_s - self.start_s, 3)
        return {"runs": [r.out for r in self.runs], "argv": self.argv, "log": self.log, "state": self.state,
                "rc": self.rc, "start_s": self.start_s, "end_s": self.end_s, "wall_s": wall}


def _without(args: Sequence[str], names: dict[str, int]) -> list[str]:
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip = names[name] if "=" not in a else 0
            continue
        out.append(a)
    return out


def _runner_options(threads: int | None, extra: Sequence[str]) -> list[str]:
    return [*(["--threads", str(threads)] if threads else []), "--gpu-slots", "0", "--progress", "lines", *extra]


def build_jobs(runs: Sequence[PlannedRun], *, threads: int | None = None, extra: Sequence[str] = (), stack: int = 1) -> list[Job]:
    """The processes a plan becomes: one per run, or K seeds of one run per process (``stack``)."""
    jobs: list[Job] = []
    own = _runner_options(threads, extra)
    # what the runner sets itself (the plan's --threads stays unless it gives its own)
    mine = {k: n for k, n in _RUNNER_OPTIONS.items() if k != "--threads" or threads}
    groups: list[list[PlannedRun]] = []
    open_group: dict[tuple, list[PlannedRun]] = {}  # the cell's group still taking seeds
    for run in runs:
        if stack > 1 and f"seed{run.seed}" == Path(run.out).name and _option(run.args, "--seed") == str(run.seed):
            cell = (tuple(_without(run.args, {**mine, "--seed": 1, "--out": 1})), str(Path(run.out).parent))
            group = open_group.get(cell)
            if group is not None and len(group) < stack:
                group.append(run)
                continue
            open_group[cell] = [run]
            groups.append(open_group[cell])
        else:
            groups.append([run])
    for group in groups:
        first = group[0]
        if len(group) == 1:
            argv = ["train", *_without(first.args, mine), *own]
        else:
            pattern = str(Path(first.out).parent / "seed{seed}")
            rest = _without(first.args, {**mine, "--seed": 1, "--out": 1})
            argv = ["train", *rest, "--seeds", ",".join(str(r.seed) for r in group), "--stacked", "--out", pattern, *own]
        jobs.append(Job(runs=group, argv=argv, log=first.log or str(Path(first.out).with_suffix(".log"))))
    return jobs


# --------------------------------------------------------------------------- the run directories
def run_state(out: str | Path) -> dict[str, Any]:
    """What a run directory holds now: completed / diverged (summary.json), partial (a
    checkpoint; E = the epochs metrics.csv holds - a job stopped between writing metrics.csv and
    its checkpoint holds one epoch more than the checkpoint, and a resume trains that one again),
    not_started; with its steps and train seconds."""
    out = Path(out)
    summary = out / "summary.json"
    if summary.exists():
        try:
            s = json.loads(summary.read_text())
            return {"state": s.get("status", "unknown"), "epochs": s.get("epochs_completed"), "steps": s.get("steps"),
                    "train_seconds": s.get("train_seconds"), "wall_seconds": s.get("wall_seconds"),
                    "final_test_acc": s.get("final_test_acc")}
        except (OSError, json.JSONDecodeError):
            return {"state": "damaged", "epochs": None, "steps": None}
    metrics = out / "metrics.csv"
    if (out / "checkpoint.pt").exists() and metrics.exists():
        try:
            with metrics.open() as f:
                rows = list(csv.DictReader(f))
        except OSError:
            rows = []
        last = rows[-1] if rows else {}
        return {"state": "partial", "epochs": len(rows), "steps": int(last["step"]) if last else 0,
                "train_seconds": None, "wall_seconds": None, "final_test_acc": None}
    return {"state": "not_started", "epochs": 0, "steps": 0}


def _epochs_planned(run: PlannedRun) -> int | None:
    value = _option(run.args, "--epochs")
    return int(value) if value and value.isdigit() else None


# --------------------------------------------------------------------------- the runner
class _Stop:
    def __init__(self):
        self.now = False

    def __call__(self, signum, frame):  # SIGTERM / SIGINT to the runner: stop as at the deadline
        self.now = True


def run_plan(plan_path: str | Path, *, procs: int, deadline_s: float, status_path: str | Path,
             threads: int | None = None, extra: Sequence[str] = (), stack: int = 1, min_start_s: float = 30.0,
             grace_s: float = 15.0, python: str = sys.executable, poll_s: float = 0.5,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the plan (see the module docstring); returns the status it also writes."""
    if procs < 1 or deadline_s <= 0:
        raise ValueError("procs must be >= 1 and deadline_s > 0")
    t_start = time.monotonic()
    deadline = t_start + deadline_s
    prepare, runs = read_plan(plan_path)
    jobs = build_jobs(runs, threads=threads, extra=extra, stack=stack)
    status_path = Path(status_path)
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    status: dict[str, Any] = {
        "version": STATUS_VERSION, "plan": str(plan_path), "procs": procs, "deadline_s": deadline_s, "threads": threads,
        "extra": list(extra), "stack": stack, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prepare": [],
    }

    def elapsed() -> float:
        return round(time.monotonic() - t_start, 3)

    def write(phase: str) -> None:
        status["phase"] = phase
        status["jobs"] = [j.record() for j in jobs]
        atomic.write_json(status_path, status)

    def env() -> dict[str, str]:
        e = dict(os.environ)
        e.pop("MSR_PREFORK_SOCKET", None)
        e["PYTHONUNBUFFERED"] = "1"
        return e

    try:
        write("prepare")
        for args in prepare:
            left = deadline - time.monotonic()
            t0 = time.monotonic()
            if stop.now or left < 5:
                status["prepare"].append({"args": args, "state": "skipped"})
                continue
            try:
                done = subprocess.run([python, "-m", "msr", "prepare", *args], capture_output=True, text=True,
                                      timeout=left, env=env())
                state, rc, tail = ("ok" if done.returncode == 0 else "failed"), done.returncode, (done.stderr or done.stdout)[-500:]
            except subprocess.TimeoutExpired:
                state, rc, tail = "timeout", None, ""
            status["prepare"].append({"args": args, "state": state, "rc": rc, "seconds": round(time.monotonic() - t0, 3), "tail": tail})
            log(f"[run-plan] prepare {' '.join(args)}: {state}")
        phase_start = elapsed()
        status["train_started_s"] = phase_start
        for job in jobs:
            if all(run_state(r.out)["state"] in ("completed", "diverged") for r in job.runs):
                job.state = "skipped"
        write("train")
        running: list[Job] = []
        queue = [j for j in jobs if j.state == "queued"]
        while queue or running:
            now = time.monotonic()
            if stop.now or now >= deadline:
                break
            for job in list(running):
                rc = job.proc.poll()
                if rc is not None:
                    job.rc, job.end_s = rc, elapsed()
                    job.state = "finished" if rc == 0 else "failed"
                    job.proc = None
                    running.remove(job)
                    _share_log(job)
                    log(f"[run-plan] {job.state} ({rc}) after {job.end_s - job.start_s:.0f}s: {', '.join(r.out for r in job.runs)}")
                    write("train")
            while queue and len(running) < procs and deadline - time.monotonic() >= min_start_s and not stop.now:
                job = queue.pop(0)
                Path(job.log).parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "ab") as f:
                    job.proc = subprocess.Popen([python, "-m", "msr", *job.argv], stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env(), start_new_session=True)
                job.state, job.start_s = "running", elapsed()
                running.append(job)
                log(f"[run-plan] started pid {job.proc.pid}: {', '.join(r.out for r in job.runs)}")
                write("train")
            if not running and queue:
                break  # too little time left to start another run
            time.sleep(poll_s)
        # the deadline (or SIGTERM): stop what still runs; each keeps its last epoch's checkpoint
        for job in running:
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for job in running:
            try:
                job.rc = job.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.rc = job.proc.wait()
            job.state = "stopped" if job.rc != 0 else "finished"
            job.end_s = elapsed()
            job.proc = None
            _share_log(job)
        for job in jobs:
            if job.state == "queued":
                job.state = "not_started"
        status["train_wall_s"] = round(elapsed() - phase_start, 3)
        status["runs"] = _runs_record(jobs)
        status.update(_totals(status))
        write("done")
        return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for job in jobs:  # never leave a child behind (an exception above)
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()


def _share_log(job: Job) -> None:
    """A stacked job wrote one log: each of its runs gets a copy at its own log path."""
    for run in job.runs[1:]:
        if run.log and run.log != job.log and Path(job.log).exists():
            Path(run.log).parent.mkdir(parents=True, exist_ok=True)
            Path(run.log).write_bytes(Path(job.log).read_bytes())


def _runs_record(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    records = []
    for index, job in enumerate(jobs):
        for run in job.runs:
            rec = {"out": run.out, "log": run.log, "wildcards": run.wildcards, "job": index,
                   "epochs_planned": _epochs_planned(run), "job_state": job.state, **run_state(run.out)}
            if job.start_s is not None and job.end_s is not None:
                rec["process_wall_s"] = round(job.end_s - job.start_s, 3)
                rec["stacked_with"] = len(job.runs)
            records.append(rec)
    return records


def _totals(status: dict[str, Any]) -> dict[str, Any]:
    runs = [r for r in status["runs"] if r.get("job_state") not in ("skipped", "not_started")]
    steps = sum(r.get("steps") or 0 for r in runs)
    wall = status.get("train_wall_s") or 0.0
    return {
        "runs_finished": sum(r["state"] in ("completed", "diverged") for r in runs),
        "runs_partial": sum(r["state"] == "partial" for r in runs),
        "steps_done": steps,
        # the whole GPU's seconds per checkpointed training step at this concurrency (evaluation
        # and start-up included; steps lost to the deadline count as cost, not as work)
        "gpu_seconds_per_step": wall / steps if steps else None,
    }


def gpu_hours(steps: int, gpu_seconds_per_step: float) -> float:
    """GPU-hours for ``steps`` training steps at a measured cost per step (``status.json``'s
    ``gpu_seconds_per_step``). A grid of runs r needs ``sum_r epochs_r * floor(N_r / B_r)``
    steps (N_r training images, batch B_r; the loader drops the last partial batch)."""
    return steps * gpu_seconds_per_step / 3600.0
