"""Run directories carried between machines as tarballs: packed where they were trained (a GPU
visit, :func:`pack_runs`), imported into a clone's ``results/<set>/`` (``msr import``,
:func:`import_runs`) so that Snakemake does not train them again.

The tarballs hold repo-relative paths, exactly where Snakemake wants them::

    results/<set>/runs/<dataset>/<arch>/<variant>/<tag>/seed<k>/{config.json,metrics.csv,probes.csv,summary.json[,checkpoint.pt]}
    results/<set>/logs/train/<dataset>/<arch>/<variant>/<tag>/seed<k>.log

A finished run (summary.json) travels without its checkpoint; a partial run (stopped at a
deadline) with it, so it resumes where it stopped. A run never straddles two tarballs.

Import treats a tarball as hostile (another local user may have made it):
- only regular files and folders; no links, devices or fifos;
- only the paths above (every component plain: letters, digits, ``._+-``; no ``..``, nothing
  absolute), only the run files named above and ``.log`` files;
- sizes capped per file and in all, and checked against the bytes actually read;
- staged in a private folder under ``results/`` first; a run directory moves into place only
  after it passed msr's own checks (msr.training.rundir: a complete run is complete, a partial
  one has a checkpoint, config and metrics that parse); a run already complete here is kept,
  and a directory here is replaced only under its RunLock (never under a live writer).
Files are written now (mtime: the import), so Snakemake's modification-time trigger sees them
newer than their input - provided the processed data they depend on exists already: import
refuses if it does not, because preparing it afterwards would make every imported run look
outdated to Snakemake. Snakemake keeps no metadata for imported files, which triggers nothing
("missing metadata" is no rerun reason); the pipeline's check_runs then compares each
config.json with the config (msr.pipeline.grid), so runs trained from the planned commands pass.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from msr.training.rundir import (
    CHECKPOINT,
    CONFIG,
    LOCK,
    METRICS,
    PROBES,
    SUMMARY,
    RunDirError,
    RunLock,
    check_complete,
    read_json,
    read_metrics,
    read_probes,
)

MiB = 2**20
RUN_FILES = (CONFIG, METRICS, PROBES, SUMMARY, CHECKPOINT)
MAX_FILE_BYTES = 256 * MiB  # a ResNet-110 checkpoint is ~14 MB; logs are small
MAX_TOTAL_BYTES = 4096 * MiB
MAX_MEMBERS = 200_000
_PART = re.compile(r"^[A-Za-z0-9._+-]+$")


class TransferError(ValueError):
    """A tarball or destination that cannot be imported as it is; the message names it."""


# --------------------------------------------------------------------------- packing
@dataclass
class Packed:
    files: list[Path] = field(default_factory=list)  # the tarballs written
    runs: dict[str, str] = field(default_factory=dict)  # run dir -> tarball name
    left_out: list[str] = field(default_factory=list)  # run dirs that did not fit


def _run_members(root: Path, run_dir: str, log: str | None) -> tuple[list[Path], bool]:
    """The files of one run to carry (repo-relative paths) and whether it is finished."""
    d = root / run_dir
    finished = (d / SUMMARY).exists()
    files = [Path(run_dir) / name for name in RUN_FILES if (d / name).is_file() and not (finished and name == CHECKPOINT)]
    if log and (root / log).is_file():
        files.append(Path(log))
    return files, finished


def _packed_size(root: Path, files: Sequence[Path]) -> int:
    """About what ``files`` add to a tar.gz: each compressed on its own, plus a header each
    (checkpoints of floats barely compress; CSVs shrink several-fold)."""
    return sum(len(zlib.compress((root / f).read_bytes(), 6)) + 1024 for f in files)


def pack_runs(root: str | Path, runs: Sequence[tuple[str, str | None]], out_dir: str | Path, *, prefix: str = "runs",
              max_files: int = 4, max_bytes: int = 14 * MiB) -> Packed:
    """Tar.gz the run directories ``runs`` ((run dir, log) pairs, repo-relative under ``root``)
    into at most ``max_files`` tarballs of at most ``max_bytes`` each (``<prefix>-<i>.tar.gz``),
    finished runs first (in the given order), then partial ones; what does not fit is listed in
    ``left_out``, never cut. Runs with nothing on disk are skipped."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for run_dir, log in runs:
        files, finished = _run_members(root, run_dir, log)
        if any(f.name in RUN_FILES for f in files):
            items.append((not finished, run_dir, files, _packed_size(root, files)))
    items.sort(key=lambda t: t[0])  # stable: finished first, each in the given order
    packed = Packed()
    budget = int(max_bytes * 0.95) - 4096  # the estimate's margin, and gzip's end of stream
    bins: list[list[tuple[str, list[Path]]]] = []
    sizes: list[int] = []
    for _, run_dir, files, size in items:
        if size > budget:
            packed.left_out.append(run_dir)
            continue
        for i, used in enumerate(sizes):
            if used + size <= budget:
                bins[i].append((run_dir, files))
                sizes[i] += size
                break
        else:
            if len(bins) < max_files:
                bins.append([(run_dir, files)])
                sizes.append(size)
            else:
                packed.left_out.append(run_dir)
    for i, content in enumerate(bins, 1):
        path = out_dir / f"{prefix}-{i}.tar.gz"
        with tarfile.open(path, "w:gz", compresslevel=6) as tar:
            for run_dir, files in content:
                for f in files:
                    tar.add(root / f, arcname=f.as_posix(), recursive=False, filter=_plain)
                packed.runs[run_dir] = path.name
        size = path.stat().st_size
        if size > max_bytes:  # the estimate was wrong: say so, never hand back an oversized file
            path.unlink()
            raise TransferError(f"{path.name} came out at {size} bytes, over the {max_bytes} limit; pack with a lower --max-mib")
        packed.files.append(path)
    return packed


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644 if info.isfile() else 0o755
    return info


# --------------------------------------------------------------------------- importing
@dataclass
class Imported:
    added: list[str] = field(default_factory=list)  # run dirs new here (complete or partial)
    replaced: list[str] = field(default_factory=list)  # partial/empty here, more done in the tarball
    kept: list[str] = field(default_factory=list)  # already complete here, or further along here
    logs: int = 0


def _check_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    parts = path.parts
    if not name or path.is_absolute() or any(p in ("", ".", "..") or not _PART.match(p) for p in parts):
        raise TransferError(f"unsafe path {name!r} (absolute, '..', or unusual characters)")
    # results/<set>/runs/<dataset>/<arch>/<variant>/<tag>/seed<k>/<file>
    if len(parts) == 9 and parts[0] == "results" and parts[2] == "runs" and parts[7].startswith("seed"):
        if parts[8] not in RUN_FILES:
            raise TransferError(f"{name!r}: not a run file ({', '.join(RUN_FILES)})")
        return path
    # results/<set>/logs/train/<dataset>/<arch>/<variant>/<tag>/seed<k>.log
    if len(parts) == 9 and parts[0] == "results" and parts[2:4] == ("logs", "train") and parts[8].startswith("seed") \
            and parts[8].endswith(".log"):
        return path
    raise TransferError(f"{name!r}: not a run file or train log under results/<set>/ (runs/<dataset>/<arch>/<variant>/<tag>/seed<k>/, "
                        "logs/train/...)")


def _read_members(tar_path: Path, staging: Path, budget: list[int]) -> list[PurePosixPath]:
    written = []
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise TransferError(f"{tar_path}: not a readable tarball ({err})") from None
    with tar:
        count = 0
        for member in tar:
            count += 1
            if count > MAX_MEMBERS:
                raise TransferError(f"{tar_path}: more than {MAX_MEMBERS} members")
            if member.isdir():
                continue  # folders are made from the files' paths only
            if not member.isfile():
                raise TransferError(f"{tar_path}: {member.name!r} is not a regular file (links, devices and fifos are refused)")
            name = _check_name(member.name)
            if member.size > MAX_FILE_BYTES:
                raise TransferError(f"{tar_path}: {member.name!r} is {member.size} bytes, over the {MAX_FILE_BYTES} limit")
            budget[0] -= member.size
            if budget[0] < 0:
                raise TransferError(f"{tar_path}: over {MAX_TOTAL_BYTES} bytes in all")
            src = tar.extractfile(member)
            if src is None:
                raise TransferError(f"{tar_path}: cannot read {member.name!r}")
            data = src.read(member.size + 1)
            if len(data) != member.size:
                raise TransferError(f"{tar_path}: {member.name!r} does not hold the {member.size} bytes its header says")
            dest = staging.joinpath(*name.parts)
            if dest.exists():
                raise TransferError(f"{tar_path}: {member.name!r} appears twice")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as f:  # never through a link: staging is ours and fresh
                f.write(data)
            written.append(name)
    return written


def _incoming_state(d: Path) -> tuple[str, int]:
    """('complete' | 'partial', epochs) of a staged run directory, after msr's own checks."""
    if (d / SUMMARY).exists():
        summary = check_complete(d, probes="full")
        return "complete", int(summary["epochs_completed"])
    for name in (CONFIG, METRICS, PROBES, CHECKPOINT):
        if not (d / name).is_file():
            raise RunDirError(f"{d.name}: a partial run without {name} cannot resume")
    read_json(d / CONFIG)
    epochs = len(read_metrics(d / METRICS))
    read_probes(d / PROBES)
    return "partial", epochs


def _local_state(d: Path) -> tuple[str, int]:
    if (d / SUMMARY).exists():
        return "complete", 1 << 30
    if (d / METRICS).exists():
        try:
            return "partial", len(read_metrics(d / METRICS))
        except RunDirError:
            return "damaged", -1
    return "empty", -1


def processed_inputs(root: Path, run_dirs: Sequence[Path]) -> dict[Path, str]:
    """The processed data cache each run's pipeline job depends on (its Snakemake input)."""
    from msr.data import cache_path  # torch: only when something is imported

    need = {}
    for d in run_dirs:
        cfg = read_json(d / CONFIG)
        path = cache_path(cfg["dataset"], root / cfg.get("data_root", "data"), image_size=cfg.get("image_size"))
        need[path] = cfg["dataset"]
    return need


def import_runs(tarballs: Sequence[str | Path], root: str | Path = ".", *, data_check: bool = True,
                log: Callable[[str], None] = print) -> Imported:
    """Put the runs of ``tarballs`` into ``root``'s ``results/`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise TransferError(f"{root}: no such folder (run msr import from the clone's root, or pass --root)")
    results = root / "results"
    results.mkdir(exist_ok=True)
    staging = results / f".import-{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    try:
        budget = [MAX_TOTAL_BYTES]
        names: list[PurePosixPath] = []
        for t in tarballs:
            names += _read_members(Path(t), staging, budget)
        run_dirs = sorted({PurePosixPath(*n.parts[:-1]) for n in names if n.parts[2] == "runs"})
        logs = [n for n in names if n.parts[2] == "logs"]
        states = {}
        for rel in run_dirs:
            try:
                states[rel] = _incoming_state(staging.joinpath(*rel.parts))
            except RunDirError as err:
                raise TransferError(f"{rel}: {err}") from None
        if data_check:
            missing = {p: ds for p, ds in processed_inputs(root, [staging.joinpath(*r.parts) for r in run_dirs]).items() if not p.exists()}
            if missing:
                cmds = "; ".join(f"msr prepare --dataset {ds} --data-root {p.parent.parent}" for p, ds in missing.items())
                raise TransferError(
                    f"the processed data {', '.join(map(str, missing))} is missing here: Snakemake would prepare it after "
                    f"the import and then retrain every imported run (its input newer). Prepare it first ({cmds}), "
                    "then import again")
        done = Imported()
        for rel in run_dirs:
            src, dest = staging.joinpath(*rel.parts), root.joinpath(*rel.parts)
            incoming, epochs = states[rel]
            here, have = _local_state(dest) if dest.exists() else ("none", -1)
            if here == "complete" or (incoming == "partial" and have >= epochs):
                done.kept.append(str(rel))
                log(f"kept {rel}: {'complete' if here == 'complete' else f'{have} epochs'} here already")
                continue
            if here == "none":
                dest.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dest)
                done.added.append(str(rel))
            else:
                with RunLock(dest):  # never under a live writer's feet
                    for child in dest.iterdir():
                        if child.name != LOCK:
                            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                    for f in src.iterdir():
                        f.rename(dest / f.name)
                done.replaced.append(str(rel))
            log(f"{'added' if here == 'none' else 'replaced'} {rel} ({incoming}, {epochs} epochs)")
        for rel in logs:
            dest = root.joinpath(*rel.parts)
            run = PurePosixPath(*rel.parts[:2], "runs", *rel.parts[4:-1], rel.parts[-1].removesuffix(".log"))
            if str(run) in done.added + done.replaced:
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.is_symlink():
                    dest.unlink()
                staging.joinpath(*rel.parts).replace(dest)
                done.logs += 1
        return done
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary_line(done: Imported) -> str:
    return (f"{len(done.added)} run(s) added, {len(done.replaced)} replaced (more done in the tarball), "
            f"{len(done.kept)} kept (complete or further along here), {done.logs} log(s)")


