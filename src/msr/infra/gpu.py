"""GPU-slot claiming: several runs per GPU, and GPU ids on multi-GPU nodes.

Snakemake counts resources but never hands out device ids (snakemake issue #281), so a train
job picks its GPU itself: ``msr train --gpu-slots K`` claims one free ``(gpu id, slot)`` pair,
``slot < K``, before anything touches CUDA, and points ``CUDA_VISIBLE_DEVICES`` at that id.

How a claim works
- Every pair has a lock file ``<lock dir>/gpu<id>.slot<k>.lock``. Holding an exclusive
  ``fcntl.flock`` on it *is* holding the slot; the file's text (pid, host, time) is only for
  people reading the folder. The lock lives as long as the open file description, so the kernel
  releases it when the process ends in any way - normal exit, exception, ``kill -9``, OOM kill.
  Nothing is ever "stale" and nothing needs cleaning up.
- Claimants serialize on ``<lock dir>/claim.lock`` for the few microseconds a claim takes, so
  each can see every GPU's load without racing another claimant: it tries every pair without
  blocking, keeps the free slot on the least-loaded GPU (lowest id on ties) and lets the other
  free ones go. Runs therefore spread over GPUs before they pile up on one.
- If every pair is held, the claimant logs one line and polls again with a growing interval
  (capped at ``max_poll_s``), logging again at most once a minute. Snakemake's resource counter
  (``gpu_slots`` = GPUs x runs per GPU) normally makes waiting rare; it covers jobs started by
  other means (another Snakemake, a person) that use the same lock folder.

Settings (environment)
- ``MSR_GPU_IDS``: comma-separated physical GPU ids (as ``CUDA_VISIBLE_DEVICES`` takes them).
  Default: the entries of ``CUDA_VISIBLE_DEVICES`` if it is set (e.g. by SLURM), otherwise every
  GPU ``nvidia-smi`` lists, otherwise (no ``nvidia-smi``) the count a short subprocess gets from
  ``torch.cuda.device_count()`` - never this process, whose CUDA must stay uninitialized.
- ``MSR_GPU_LOCK_DIR``: the lock folder. Default: ``<system temp dir>/msr-gpu-locks-<uid>``, so
  one user's jobs coordinate with each other. Several users can share one folder if it and its
  files are writable by all of them (group-writable folder, umask 002). flock needs a local
  filesystem (not every network filesystem honours it). Inside a Slurm allocation
  (``SLURM_JOB_ID`` set) the default is the allocation's own folder,
  ``msr-gpu-locks-<uid>-slurm<job id>``: Slurm has already given the job its GPUs, so only the
  runs inside one allocation share them - and where Slurm confines devices, jobs on different
  GPUs of a node may all see theirs as id 0, so a node-wide folder would make them wait for each
  other's slots.

The lease is process-wide by nature (``CUDA_VISIBLE_DEVICES`` is process-wide), so the held file
is kept in a module-level list for the life of the process. Its descriptor is not inherited by
programs the process ``exec``s (Python opens files non-inheritable); a ``fork`` without ``exec``
shares it, so such a child keeps the slot until it ends too.

This module does not import torch: a claimant pays nothing for it, and importing it cannot
initialize CUDA.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENV_IDS = "MSR_GPU_IDS"
ENV_LOCK_DIR = "MSR_GPU_LOCK_DIR"

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]+$")


class GpuSlotError(ValueError):
    """A claim that cannot be made as asked (bad ids, bad K, CUDA already initialized, timeout)."""


@dataclass
class GpuSlot:
    """One held ``(gpu id, slot)`` pair. ``release()`` gives it back early (tests, tools)."""

    gpu_id: str
    slot: int
    path: Path
    _fd: int | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
            if self in _HELD:
                _HELD.remove(self)


# The slots this process holds, so their descriptors stay open until the process ends.
_HELD: list[GpuSlot] = []


def default_lock_dir() -> Path:
    name = f"msr-gpu-locks-{os.getuid()}"
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if job.isdigit():  # one folder per Slurm allocation (module docstring)
        name += f"-slurm{job}"
    return Path(tempfile.gettempdir()) / name


def lock_dir_from_env() -> Path:
    value = os.environ.get(ENV_LOCK_DIR, "").strip()
    return Path(value) if value else default_lock_dir()


def parse_ids(text: str, source: str) -> list[str]:
    """``"0, 1,3"`` -> ``["0", "1", "3"]``; errors name ``source`` and the bad entry."""
    ids = [part.strip() for part in text.split(",")]
    if any(not i for i in ids):
        raise GpuSlotError(f"{source}={text!r}: empty GPU id (expected e.g. 0,1,2)")
    bad = [i for i in ids if not _SAFE_ID.match(i)]
    if bad:
        raise GpuSlotError(f"{source}={text!r}: GPU id {bad[0]!r} has characters other than letters, digits, '.', '_', ':', '-'")
    if len(set(ids)) != len(ids):
        raise GpuSlotError(f"{source}={text!r}: a GPU id appears twice")
    return ids


def _nvidia_smi_ids() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _torch_subprocess_count() -> int:
    # In a child, so this process's CUDA runtime never starts before CUDA_VISIBLE_DEVICES is set.
    code = "import torch; print(torch.cuda.device_count())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip()) if done.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0


def visible_gpu_ids() -> list[str]:
    """The GPU ids to claim from (see the module docstring for the order of sources)."""
    explicit = os.environ.get(ENV_IDS, "").strip()
    if explicit:
        return parse_ids(explicit, ENV_IDS)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        cvd = cvd.strip()
        # "" or "-1" (or anything from a negative entry on) hides every GPU, as CUDA reads it
        if not cvd or cvd.startswith("-"):
            return []
        return parse_ids(cvd.split(",-")[0], "CUDA_VISIBLE_DEVICES")
    smi = _nvidia_smi_ids()
    if smi is not None:
        return smi
    return [str(i) for i in range(_torch_subprocess_count())]


def _cuda_already_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # a half-imported torch: it cannot have initialized CUDA either
        return False


def _lock_name(gpu_id: str, slot: int) -> str:
    return f"gpu{gpu_id}.slot{slot}.lock"


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        raise GpuSlotError(f"cannot open the GPU lock file {path}: {e.strerror} (is {ENV_LOCK_DIR} writable by every user of it?)") from None


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another process holds it."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_claim_once(ids: list[str], slots_per_gpu: int, lock_dir: Path) -> GpuSlot | None:
    """One pass under the claim lock: the free slot on the least-loaded GPU, or None."""
    guard = _open_lock_file(lock_dir / "claim.lock")
    acquired: dict[tuple[int, int], int] = {}  # (gpu index, slot) -> fd
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # held for microseconds; released by close below
        for gi, gpu_id in enumerate(ids):
            for k in range(slots_per_gpu):
                fd = _try_lock(lock_dir / _lock_name(gpu_id, k))
                if fd is not None:
                    acquired[(gi, k)] = fd
        if not acquired:
            return None
        free = [sum(1 for (gi, _) in acquired if gi == g) for g in range(len(ids))]
        # least loaded = most free slots; ties go to the lower id, then the lower slot
        gi, k = min(acquired, key=lambda pair: (-free[pair[0]], pair[0], pair[1]))
        fd = acquired.pop((gi, k))
        return GpuSlot(ids[gi], k, lock_dir / _lock_name(ids[gi], k), fd)
    finally:
        for other in acquired.values():
            os.close(other)
        os.close(guard)


def _stamp(slot: GpuSlot) -> None:
    """Write who holds the slot into its file (for people; the flock is what counts)."""
    text = (
        f"pid={os.getpid()} host={socket.gethostname()} gpu={slot.gpu_id} slot={slot.slot} "
        f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
    )
    os.ftruncate(slot._fd, 0)
    os.pwrite(slot._fd, text.encode(), 0)


def claim_gpu_slot(
    slots_per_gpu: int,
    *,
    ids: list[str] | None = None,
    lock_dir: str | Path | None = None,
    poll_s: float = 0.5,
    max_poll_s: float = 10.0,
    timeout_s: float | None = None,
    set_env: bool = True,
    log: Callable[[str], None] | None = None,
) -> GpuSlot:
    """Claim one free ``(gpu id, slot)`` pair and hold it until this process ends.

    ``ids`` / ``lock_dir`` default to the environment (module docstring). With ``set_env``,
    ``CUDA_VISIBLE_DEVICES`` becomes the claimed id, so this process's ``cuda:0`` is that GPU.
    Waits while every pair is held (polling every ``poll_s`` s, growing to ``max_poll_s``);
    ``timeout_s`` (None: wait as long as it takes) bounds the wait.
    """
    if isinstance(slots_per_gpu, bool) or not isinstance(slots_per_gpu, int) or slots_per_gpu < 1:
        raise GpuSlotError(f"runs per GPU must be an integer >= 1, got {slots_per_gpu!r}")
    if not 0 < poll_s <= max_poll_s:
        raise GpuSlotError(f"poll interval must satisfy 0 < poll_s <= max_poll_s, got {poll_s}, {max_poll_s}")
    if set_env and _cuda_already_initialized():
        raise GpuSlotError("CUDA is already initialized in this process: claim the GPU slot before anything uses CUDA")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ids = visible_gpu_ids() if ids is None else list(ids)
    if not ids:
        raise GpuSlotError(f"no GPU ids to claim from: no GPU is visible; set {ENV_IDS} (e.g. 0,1)")
    lock_dir = Path(lock_dir) if lock_dir is not None else lock_dir_from_env()
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise GpuSlotError(f"cannot create the GPU lock folder {lock_dir} ({ENV_LOCK_DIR}): {e.strerror}") from None

    start = time.monotonic()
    last_log = None
    wait = poll_s
    while True:
        slot = _try_claim_once(ids, slots_per_gpu, lock_dir)
        if slot is not None:
            break
        now = time.monotonic()
        if timeout_s is not None and now - start >= timeout_s:
            raise GpuSlotError(
                f"no free GPU slot after {timeout_s:.0f} s: all {len(ids)} GPU(s) x {slots_per_gpu} slots are held (lock folder {lock_dir})"
            )
        if last_log is None or now - last_log >= 60:
            log(
                f"msr: all {len(ids) * slots_per_gpu} GPU slots ({len(ids)} GPU(s) x {slots_per_gpu}) are held; "
                f"waiting for one to free (lock folder {lock_dir})"
            )
            last_log = now
        sleep = wait if timeout_s is None else min(wait, max(0.0, timeout_s - (now - start)))
        time.sleep(sleep)
        wait = min(wait * 1.5, max_poll_s)

    _stamp(slot)
    _HELD.append(slot)
    if set_env:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu_id
    return slot


def claim_for_run(slots_per_gpu: int, device: str, *, log: Callable[[str], None] | None = None) -> GpuSlot | None:
    """What ``msr train --gpu-slots K`` does before the run is built.

    - ``K == 0``: nothing (the default).
    - ``device == "cpu"``: nothing but one log line - a CPU run uses no GPU, so holding a slot
      would only keep a GPU run waiting. (A no-op rather than an error, so one command line can
      serve a config set whether its device is CPU or GPU.)
    - ``device == "auto"`` and no GPU visible: nothing but a log line; the run goes to the CPU
      as ``auto`` says.
    - otherwise: claim (``device == "cuda"`` with no GPU visible is an error).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if isinstance(slots_per_gpu, bool) or not isinstance(slots_per_gpu, int) or slots_per_gpu < 0:
        raise GpuSlotError(f"--gpu-slots must be an integer >= 0 (runs per GPU; 0 = off), got {slots_per_gpu!r}")
    if slots_per_gpu == 0:
        return None
    if device == "cpu":
        log("msr train: --gpu-slots ignored: the run is on the CPU (--device cpu) and holds no GPU slot")
        return None
    ids = visible_gpu_ids()
    if device == "auto" and not ids:
        log("msr train: --gpu-slots ignored: no GPU is visible, so --device auto runs on the CPU")
        return None
    slot = claim_gpu_slot(slots_per_gpu, ids=ids, log=log)
    log(f"msr train: claimed GPU {slot.gpu_id} slot {slot.slot} of {slots_per_gpu} (CUDA_VISIBLE_DEVICES={slot.gpu_id}; lock {slot.path})")
    return slot
