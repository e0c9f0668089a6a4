"""GPU-slot claiming: several runs per GPU, and GPU ids on multi-GPU nodes.

Snakemake counts resources but never hands out device ids (snakemake issue #281), so a train
job picks its GPU itself: ``msr train --gpu-slots K`` claims one free ``(gpu id, slot)`` pair,
``slot < K``, before anything touches CUDA, and points ``CUDA_VISIBLE_DEVICES`` at that id.

How a claim works
- Every pair has a lock file ``<lock dir>/gpu<id>.slot<k>.lock``. Holding an exclusive
  ``fcntl.flock`` on it *is* holding the slot; the file's text (pid, host, time) is only for
  people reading the folder (and for the message that names who holds a slot). The lock lives
  as long as the open file description, so the kernel releases it when the process ends in any
  way - normal exit, exception, ``kill -9``, OOM kill. Nothing is ever "stale" and nothing needs
  cleaning up.
- Claimants serialize on ``<lock dir>/claim.lock`` for the few microseconds a claim takes, so
  each can see every GPU's load without racing another claimant: it tries every pair without
  blocking, keeps the free slot on the least-loaded GPU (lowest id on ties) and lets the other
  free ones go. Runs therefore spread over GPUs before they pile up on one.
- If every pair is held, the claimant logs one line naming the holders and polls again with a
  growing interval (capped at ``max_poll_s``), logging again at most once a minute, until a
  deadline (``--gpu-wait S``, ``$MSR_GPU_WAIT_S``, the pipeline's ``resources.gpu_wait_s``;
  default :data:`DEFAULT_WAIT_S`); then it fails with one line naming every holder. Snakemake's
  resource counter (``gpu_slots`` = GPUs x runs per GPU) normally makes waiting rare; it covers
  jobs started by other means (another Snakemake, a person) that use the same lock folder.

The lock folder, written as if another local user were hostile
- The default folder is private: ``<system temp dir>/msr-gpu-locks-<uid>``, created ``0700``.
  Its name is predictable, so another user may create it first (with links inside, or holding
  locks in it): msr opens it with ``O_NOFOLLOW | O_DIRECTORY`` and uses it only if it is a real
  folder owned by this user with no group or other permissions - otherwise it stops with one
  line that names the folder and what is wrong, and touches nothing. Inside a Slurm allocation
  (``SLURM_JOB_ID`` set) the default is the allocation's own folder,
  ``msr-gpu-locks-<uid>-slurm<job id>``: Slurm has already given the job its GPUs, so only the
  runs inside one allocation share them - and where Slurm confines devices, jobs on different
  GPUs of a node may all see theirs as id 0, so a node-wide folder would make them wait for each
  other's slots.
- A folder named explicitly (``$MSR_GPU_LOCK_DIR``, or ``lock_dir=``) may be shared by several
  users: make it group-writable and setgid for the group that shares it
  (``mkdir -m 2770 DIR; chgrp GROUP DIR``). msr refuses one that every user may write, creates
  its lock files group-read-writable (``0660``, whatever the umask), and still follows no
  symbolic link - neither the folder itself nor a lock file. flock needs a local filesystem
  (not every network filesystem honours it).
- Lock files are opened relative to the folder's descriptor (``dir_fd``) with ``O_NOFOLLOW``,
  and used only if they are regular files with one link (no symlink, hard link, FIFO or
  device), owned by this user in the private folder. A planted link therefore never redirects
  the pid stamp into another file.

Settings (environment)
- ``MSR_GPU_IDS``: comma-separated physical GPU ids (as ``CUDA_VISIBLE_DEVICES`` takes them).
  Default: the entries of ``CUDA_VISIBLE_DEVICES`` if it is set (e.g. by SLURM), otherwise every
  GPU ``nvidia-smi`` lists, otherwise (no ``nvidia-smi``) the count a short subprocess gets from
  ``torch.cuda.device_count()`` - never this process, whose CUDA must stay uninitialized.
- ``MSR_GPU_LOCK_DIR``: the lock folder (above). Default: the private folder.
- ``MSR_GPU_WAIT_S``: how long to wait for a free slot, in seconds (``inf``: no deadline).

The lease is process-wide by nature (``CUDA_VISIBLE_DEVICES`` is process-wide), so the held file
is kept in a module-level list for the life of the process. Its descriptor is not inherited by
programs the process ``exec``s (Python opens files non-inheritable); a ``fork`` without ``exec``
shares it, so such a child keeps the slot until it ends too.

This module does not import torch: a claimant pays nothing for it, and importing it cannot
initialize CUDA.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ENV_IDS = "MSR_GPU_IDS"
ENV_LOCK_DIR = "MSR_GPU_LOCK_DIR"
ENV_WAIT = "MSR_GPU_WAIT_S"
# An hour: long enough for a queued run to outwait a typical run of another pipeline, short
# enough that a slot held by something stuck (or by another user) surfaces as an error that
# names the holder, instead of a job that waits forever.
DEFAULT_WAIT_S = 3600.0

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]+$")
_PRIVATE_MODE = 0o600  # lock files in the private folder
_SHARED_MODE = 0o660  # lock files in a folder shared by a group
_STAMP_MAX = 256  # bytes of a holder's stamp read back (it may come from another user)


class GpuSlotError(ValueError):
    """A claim that cannot be made as asked (bad ids, bad K, CUDA already initialized, an unsafe
    lock folder or file, timeout)."""


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
    """This user's private folder (one per Slurm allocation inside one; module docstring)."""
    name = f"msr-gpu-locks-{os.getuid()}"
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if job.isdigit():
        name += f"-slurm{job}"
    return Path(tempfile.gettempdir()) / name


def lock_dir_from_env() -> tuple[Path, bool]:
    """The lock folder and whether it was named explicitly (``$MSR_GPU_LOCK_DIR``: may be shared)."""
    value = os.environ.get(ENV_LOCK_DIR, "").strip()
    return (Path(value), True) if value else (default_lock_dir(), False)


def wait_from_env() -> float:
    """``$MSR_GPU_WAIT_S`` in seconds, else :data:`DEFAULT_WAIT_S`."""
    value = os.environ.get(ENV_WAIT, "").strip()
    return DEFAULT_WAIT_S if not value else parse_wait(value, ENV_WAIT)


def parse_wait(text: str | float, source: str) -> float:
    """A wait in seconds: a number >= 0, or ``inf`` for no deadline; errors name ``source``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0:  # also NaN
        raise GpuSlotError(f"{source}={text!r}: expected seconds >= 0 (or inf: no deadline)")
    return value


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


# ----------------------------------------------------------------- the folder and its files
@dataclass
class _LockDir:
    """The lock folder, open: every file in it is opened relative to ``fd``, so no path lookup
    after the checks below can be redirected (a folder swapped for a link meanwhile)."""

    path: Path
    fd: int
    shared: bool

    def close(self) -> None:
        os.close(self.fd)


def _unsafe(path: Path, problem: str, shared: bool) -> GpuSlotError:
    fix = (f"make it a folder writable by your group only (chmod o-w {path})" if shared else
           f"if it is yours and no msr job uses it, remove it (rm -r {path}); otherwise set "
           f"{ENV_LOCK_DIR} to a folder of your own")
    return GpuSlotError(f"unsafe GPU lock folder {path}: {problem}; nothing was written. To fix: {fix}")


def _open_lock_dir(path: Path, *, shared: bool) -> _LockDir:
    """Create (``0700``) or open the lock folder, refusing one another user could tamper with."""
    created = False
    try:
        if shared:  # a folder the user named: its parents are the user's to choose
            path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise GpuSlotError(f"cannot create the GPU lock folder {path} ({ENV_LOCK_DIR}): {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if os.path.islink(path) else "not a folder"
            raise _unsafe(path, f"it is {kind} (msr follows no link here)", shared) from None
        raise GpuSlotError(f"cannot open the GPU lock folder {path} ({ENV_LOCK_DIR}): {e.strerror}") from None
    try:
        st = os.fstat(fd)
        uid, mode = os.getuid(), stat.S_IMODE(st.st_mode)
        if created and not shared and st.st_uid == uid:
            os.fchmod(fd, 0o700)  # whatever the umask took away or left
            mode = 0o700
        if not shared and st.st_uid != uid:
            raise _unsafe(path, f"it belongs to uid {st.st_uid}, not to you (uid {uid})", shared)
        if not shared and mode & 0o077:
            raise _unsafe(path, f"its mode is {mode:04o}, not 0700: other users could plant or hold lock files in it", shared)
        if shared and mode & stat.S_IWOTH:
            raise _unsafe(path, f"every user may write to it (mode {mode:04o})", shared)
    except BaseException:
        os.close(fd)
        raise
    return _LockDir(path, fd, shared)


def _open_lock_file(lock_dir: _LockDir, name: str) -> int:
    """An open descriptor of ``name`` in the folder: created if missing, never through a link."""
    path = lock_dir.path / name
    mode = _SHARED_MODE if lock_dir.shared else _PRIVATE_MODE
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
    try:
        fd = os.open(name, flags, mode, dir_fd=lock_dir.fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise GpuSlotError(f"the GPU lock file {path} is a symbolic link: refusing to follow it "
                               "(what it points to was not touched; remove the link)") from None
        raise GpuSlotError(f"cannot open the GPU lock file {path}: {e.strerror} (is {ENV_LOCK_DIR} writable by every user of it?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise GpuSlotError(f"the GPU lock file {path} is {what}: refusing it (it was not written to; remove it)")
        if not lock_dir.shared and st.st_uid != os.getuid():
            raise GpuSlotError(f"the GPU lock file {path} belongs to uid {st.st_uid}, not to you: refusing it "
                               "(it was not written to; remove it)")
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)  # group-writable in a shared folder whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(lock_dir: _LockDir, name: str) -> int | None:
    """An fd holding an exclusive flock on ``name``, or None if another process holds it."""
    fd = _open_lock_file(lock_dir, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_claim_once(ids: list[str], slots_per_gpu: int, lock_dir: _LockDir) -> GpuSlot | None:
    """One pass under the claim lock: the free slot on the least-loaded GPU, or None."""
    guard = _open_lock_file(lock_dir, "claim.lock")
    acquired: dict[tuple[int, int], int] = {}  # (gpu index, slot) -> fd
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # held for microseconds; released by close below
        for gi, gpu_id in enumerate(ids):
            for k in range(slots_per_gpu):
                fd = _try_lock(lock_dir, _lock_name(gpu_id, k))
                if fd is not None:
                    acquired[(gi, k)] = fd
        if not acquired:
            return None
        free = [sum(1 for (gi, _) in acquired if gi == g) for g in range(len(ids))]
        # least loaded = most free slots; ties go to the lower id, then the lower slot
        gi, k = min(acquired, key=lambda pair: (-free[pair[0]], pair[0], pair[1]))
        fd = acquired.pop((gi, k))
        return GpuSlot(ids[gi], k, lock_dir.path / _lock_name(ids[gi], k), fd)
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


def _holder(lock_dir: _LockDir, name: str) -> str:
    """Who holds ``name``, from its stamp - printable characters only (another user may have
    written it), or a placeholder."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=lock_dir.fd)
    except OSError:
        return "unknown holder"
    try:
        raw = os.read(fd, _STAMP_MAX) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        raw = b""
    finally:
        os.close(fd)
    text = "".join(c for c in raw.decode("utf-8", "replace") if c.isprintable()).strip()
    return text or "unknown holder (no stamp yet)"


def _holders(lock_dir: _LockDir, ids: list[str], slots_per_gpu: int, limit: int = 8) -> str:
    names = [_lock_name(g, k) for g in ids for k in range(slots_per_gpu)]
    shown = [f"{name}: {_holder(lock_dir, name)}" for name in names[:limit]]
    more = f"; and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(shown) + more


# --------------------------------------------------------------------------------- claims
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

    ``ids`` / ``lock_dir`` default to the environment (module docstring); a ``lock_dir`` given
    here counts as named explicitly (it may be shared). With ``set_env``,
    ``CUDA_VISIBLE_DEVICES`` becomes the claimed id, so this process's ``cuda:0`` is that GPU.
    Waits while every pair is held (polling every ``poll_s`` s, growing to ``max_poll_s``) for
    at most ``timeout_s`` seconds (None: ``$MSR_GPU_WAIT_S``, else :data:`DEFAULT_WAIT_S`;
    ``math.inf``: no deadline), then raises a :class:`GpuSlotError` that names the holders.
    """
    if isinstance(slots_per_gpu, bool) or not isinstance(slots_per_gpu, int) or slots_per_gpu < 1:
        raise GpuSlotError(f"runs per GPU must be an integer >= 1, got {slots_per_gpu!r}")
    if not 0 < poll_s <= max_poll_s:
        raise GpuSlotError(f"poll interval must satisfy 0 < poll_s <= max_poll_s, got {poll_s}, {max_poll_s}")
    timeout_s = wait_from_env() if timeout_s is None else parse_wait(timeout_s, "timeout_s")
    if set_env and _cuda_already_initialized():
        raise GpuSlotError("CUDA is already initialized in this process: claim the GPU slot before anything uses CUDA")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    ids = visible_gpu_ids() if ids is None else list(ids)
    if not ids:
        raise GpuSlotError(f"no GPU ids to claim from: no GPU is visible; set {ENV_IDS} (e.g. 0,1)")
    path, shared = (Path(lock_dir), True) if lock_dir is not None else lock_dir_from_env()
    folder = _open_lock_dir(path, shared=shared)
    try:
        slot = _wait_for_slot(ids, slots_per_gpu, folder, poll_s, max_poll_s, timeout_s, log)
    finally:
        folder.close()  # the held lock file stays open; the folder's descriptor is not needed
    _stamp(slot)
    _HELD.append(slot)
    if set_env:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu_id
    return slot


def _wait_for_slot(ids: list[str], slots_per_gpu: int, folder: _LockDir, poll_s: float,
                   max_poll_s: float, timeout_s: float, log: Callable[[str], None]) -> GpuSlot:
    start = time.monotonic()
    last_log = None
    wait = poll_s
    total = f"{len(ids) * slots_per_gpu} GPU slots ({len(ids)} GPU(s) x {slots_per_gpu})"
    while True:
        slot = _try_claim_once(ids, slots_per_gpu, folder)
        if slot is not None:
            return slot
        now = time.monotonic()
        if now - start >= timeout_s:
            raise GpuSlotError(
                f"no free GPU slot after {timeout_s:g} s: all {total} are held - "
                f"{_holders(folder, ids, slots_per_gpu)} (lock folder {folder.path}). Wait longer "
                f"(msr train --gpu-wait S, ${ENV_WAIT}, the pipeline's resources.gpu_wait_s) or stop a holder"
            )
        if last_log is None or now - last_log >= 60:
            log(
                f"msr: all {total} are held; waiting for one to free, at most {timeout_s:g} s - "
                f"{_holders(folder, ids, slots_per_gpu)} (lock folder {folder.path})"
            )
            last_log = now
        time.sleep(min(wait, max(0.0, timeout_s - (now - start))))
        wait = min(wait * 1.5, max_poll_s)


def claim_for_run(slots_per_gpu: int, device: str, *, wait_s: float | None = None,
                  log: Callable[[str], None] | None = None) -> GpuSlot | None:
    """What ``msr train --gpu-slots K [--gpu-wait S]`` does before the run is built.

    - ``K == 0``: nothing (the default).
    - ``device == "cpu"``: nothing but one log line - a CPU run uses no GPU, so holding a slot
      would only keep a GPU run waiting. (A no-op rather than an error, so one command line can
      serve a config set whether its device is CPU or GPU.)
    - ``device == "auto"`` and no GPU visible: nothing but a log line; the run goes to the CPU
      as ``auto`` says.
    - otherwise: claim, waiting at most ``wait_s`` seconds (None: ``$MSR_GPU_WAIT_S`` or
      :data:`DEFAULT_WAIT_S`); ``device == "cuda"`` with no GPU visible is an error.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if isinstance(slots_per_gpu, bool) or not isinstance(slots_per_gpu, int) or slots_per_gpu < 0:
        raise GpuSlotError(f"--gpu-slots must be an integer >= 0 (runs per GPU; 0 = off), got {slots_per_gpu!r}")
    wait_s = wait_from_env() if wait_s is None else parse_wait(wait_s, "--gpu-wait")
    if slots_per_gpu == 0:
        return None
    if device == "cpu":
        log("msr train: --gpu-slots ignored: the run is on the CPU (--device cpu) and holds no GPU slot")
        return None
    ids = visible_gpu_ids()
    if device == "auto" and not ids:
        log("msr train: --gpu-slots ignored: no GPU is visible, so --device auto runs on the CPU")
        return None
    slot = claim_gpu_slot(slots_per_gpu, ids=ids, timeout_s=wait_s, log=log)
    log(f"msr train: claimed GPU {slot.gpu_id} slot {slot.slot} of {slots_per_gpu} (CUDA_VISIBLE_DEVICES={slot.gpu_id}; lock {slot.path})")
    return slot
