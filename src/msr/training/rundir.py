"""The run directory's files (docs/architecture.md, "The run directory"): names, columns, strict readers,
the completeness check and the writer lock - shared by the trainer (resume) and the
aggregation (tables), so both accept and reject exactly the same directories.

A run directory is consistent or rejected, never half-used:

- ``metrics.csv`` holds the epochs 1..E of its run and ``probes.csv`` parses completely. Every
  msr write is atomic (msr.atomic), so a truncated file (last line cut, rows with missing fields)
  means outside damage - a copy that ran out of space, an editor, a partial sync. It is a
  :class:`RunDirError` that names the file and says to delete the run directory, never a clean
  restart: silently retraining would hide the damage and throw away finished epochs.
- "complete" means ``summary.json`` *and* a ``metrics.csv`` that agrees with it (the same
  epochs, the same headline accuracy); a ``completed`` summary with a NaN headline is damaged.
- One writer at a time: :class:`RunLock` (``fcntl.flock`` on ``<out>/.lock``).
"""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import io
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

CONFIG, METRICS, PROBES, SUMMARY, CHECKPOINT, LOCK = (
    "config.json", "metrics.csv", "probes.csv", "summary.json", "checkpoint.pt", ".lock")
METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "clean_train_loss", "clean_train_acc",
                  "test_loss", "test_acc", "seconds", "images_per_s"]
METRIC_TYPES = [int, int] + [float] * (len(METRIC_COLUMNS) - 2)
PROBE_COLUMNS = ["step", "layer", "metric", "value"]
PROBE_TYPES = [int, str, str, float]
STATUSES = ("completed", "diverged")
# what a config.json written before a key existed means by its absence (dotted keys read into
# nested objects), so runs of an older msr stay valid where nothing changed for them
MISSING_MEANS = {"eval_split": "test", "validation_size": None,
                 "variant_spec.warmup": 0.0, "variant_spec.warmup_from": 0.0}


class RunDirError(Exception):
    """A run directory that cannot be used as it is - damaged, incomplete, of an older schema,
    written by another process, or on a full disk. The message is one line that names the file
    and what to do."""


def delete_hint(out: Path) -> str:
    return f"delete {out} to rerun this run"


def damaged(path: Path, what: str) -> RunDirError:
    """The error for a damaged file of the run directory ``path.parent``."""
    return RunDirError(f"{path}: {what}; the run directory is damaged: {delete_hint(path.parent)}")


# --------------------------------------------------------------------------------------------
# Strict readers


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise damaged(path, f"unreadable ({err.__class__.__name__})") from None
    except json.JSONDecodeError as err:
        raise damaged(path, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(value, dict):
        raise damaged(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def _check_header(path: Path, header: list[str], columns: list[str]) -> None:
    if header == columns:
        return
    missing = [c for c in columns if c not in header]
    if header and missing and set(header) < set(columns):
        # a complete file of an older msr: not damage, but not resumable or comparable
        raise RunDirError(
            f"{path}: written by an older msr (no column {', '.join(missing)}; the run-directory "
            f"schema changed): {delete_hint(path.parent)}")
    raise damaged(path, f"unexpected header {header} (expected {columns})")


def read_csv(path: Path, columns: list[str], types: list[type]) -> list[tuple]:
    """Every row of a run-directory CSV, typed; a missing file, a foreign header, a truncated
    last line or a row that does not parse is a :class:`RunDirError` naming the line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise damaged(path, f"unreadable ({err.__class__.__name__})") from None
    if not text:
        raise damaged(path, "empty")
    # msr ends every line with a newline: a file that does not was cut short mid-line
    if not text.endswith("\n"):
        raise damaged(path, f"truncated (line {text.count(chr(10)) + 1} is cut short)")
    reader = csv.reader(io.StringIO(text))
    _check_header(path, next(reader), columns)
    rows = []
    for row in reader:
        line = reader.line_num
        if len(row) != len(columns):
            raise damaged(path, f"line {line} has {len(row)} fields, expected {len(columns)}")
        try:
            rows.append(tuple(t(v) for t, v in zip(types, row, strict=True)))
        except ValueError:
            raise damaged(path, f"line {line} does not parse: {','.join(row)!r}") from None
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [dict(zip(METRIC_COLUMNS, r, strict=True)) for r in read_csv(path, METRIC_COLUMNS, METRIC_TYPES)]


def read_probes(path: Path) -> list[tuple]:
    return read_csv(path, PROBE_COLUMNS, PROBE_TYPES)


def check_probe_rows(path: Path, rows: list[tuple]) -> None:
    """Every probed step has the same (layer, metric) rows (``grad_norm`` only at some steps):
    catches a probes.csv cut exactly at a line end, which no parser notices."""
    by_step: dict[int, set] = {}
    for step, layer, metric, _ in rows:
        if metric != "grad_norm":
            by_step.setdefault(step, set()).add((layer, metric))
    if not by_step:
        return
    full = max(by_step.values(), key=len)
    for step, seen in by_step.items():
        if seen != full:
            raise damaged(path, f"step {step} has {len(seen)} of the {len(full)} rows of a probe")


def last_probe_step(path: Path) -> int | None:
    """The step of ``probes.csv``'s last row, checking only its header and its end: the full
    file of a long run is tens of MB, and the aggregation checks every run."""
    try:
        with path.open("rb") as f:
            header = f.readline().decode(errors="replace").rstrip("\r\n").split(",")
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except OSError as err:
        raise damaged(path, f"unreadable ({err.__class__.__name__})") from None
    _check_header(path, header, PROBE_COLUMNS)
    if not tail.endswith(b"\n"):
        raise damaged(path, "truncated (the last line is cut short)")
    lines = tail.decode(errors="replace").splitlines()
    last = lines[-1] if lines else ""
    if ",".join(header) == last:  # header only
        return None
    fields = next(csv.reader([last]), [])
    try:
        if len(fields) != len(PROBE_COLUMNS):
            raise ValueError
        step = int(fields[0])
        float(fields[3])
    except ValueError:
        raise damaged(path, f"the last line does not parse: {last!r}") from None
    return step


# --------------------------------------------------------------------------------------------
# Completeness


def check_complete(out: Path, *, probes: str = "tail") -> dict[str, Any]:
    """The summary of a complete run directory, after checking that its files agree; else a
    :class:`RunDirError` naming the damaged file.

    Complete = ``config.json`` and ``summary.json`` parse, ``summary.json`` has a known status,
    ``metrics.csv`` holds exactly the epochs 1..``epochs_completed`` in the current schema,
    a ``completed`` run has a finite headline equal to its last epoch's test accuracy and ran
    the configured epochs, and ``probes.csv`` is whole and reaches the run's last step.
    ``probes="full"`` parses every probe row (``"tail"``: its header and last line).
    """
    out = Path(out)
    summary = read_json(out / SUMMARY)
    config = read_json(out / CONFIG)
    status = summary.get("status")
    if status not in STATUSES:
        raise damaged(out / SUMMARY, f"status {status!r} is not one of {', '.join(STATUSES)}")
    metrics = read_metrics(out / METRICS)
    epochs = [m["epoch"] for m in metrics]
    done = summary.get("epochs_completed")
    if epochs != list(range(1, len(epochs) + 1)) or len(epochs) != done:
        raise damaged(out / METRICS, f"holds epochs {span(epochs)}, but {SUMMARY} says {done} epoch(s) completed")
    if status == "completed":
        headline = summary.get("final_test_acc")
        if not isinstance(headline, int | float) or not math.isfinite(headline):
            raise damaged(out / SUMMARY, f"a completed run with final_test_acc {headline!r}")
        if not metrics or metrics[-1]["test_acc"] != headline:
            raise damaged(out / METRICS, f"its last test_acc does not match final_test_acc {headline} of {SUMMARY}")
        if config.get("epochs") != done:
            raise damaged(out / SUMMARY, f"{done} epoch(s) completed, but {CONFIG} asks for {config.get('epochs')}")
    if probes == "full":
        rows = read_probes(out / PROBES)
        check_probe_rows(out / PROBES, rows)
        last = rows[-1][0] if rows else None
    else:
        last = last_probe_step(out / PROBES)
    # every epoch end is probed, so a completed run's probes end at its last step
    if status == "completed" and last != summary.get("steps"):
        raise damaged(out / PROBES, f"ends at step {last}, but the run ended at step {summary.get('steps')}")
    return summary


def span(epochs: list[int]) -> str:
    """``1..4`` for a contiguous list of epochs, else the list itself."""
    if not epochs:
        return "none"
    if len(epochs) > 1 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}..{epochs[-1]}"
    return ", ".join(map(str, epochs))


# --------------------------------------------------------------------------------------------
# One writer per run directory


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<out>/.lock``, held while a process writes ``out``.

    The kernel drops the lock when the process dies (kill -9 included), so a stale ``.lock``
    file never blocks anyone; it only carries the holder's pid, host and start time, for the
    message the next writer gets while the holder lives. The file is removed on release; a
    writer that locked a file just removed by the previous holder notices (the path now names
    another inode, or none) and locks the new file instead, so two writers never both hold
    "the" lock.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise RunDirError(
                    f"{self.out} is being written by another process ({holder or 'holder not recorded yet'}); "
                    "wait for it to finish or stop it, then rerun") from None
            try:
                here = os.stat(self.path)
                mine = os.fstat(fd)
                same = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # unlink while still holding it (see the class docstring for why that is safe)
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
