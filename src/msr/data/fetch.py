"""Getting raw files onto disk safely: downloads, staging next to the target, checksums,
archive extraction.

Every dataset that fetches files uses these, so the guarantees hold for all of them:

- **No hang.** Each download has a socket timeout (:data:`TIMEOUT_S` per connect/read) and a
  bounded number of tries (:data:`TRIES`, with exponential backoff from :data:`BACKOFF_S`). We
  do not call ``torchvision.datasets.utils.download_url`` for this reason: it opens URLs without
  a timeout, so a server that accepts the connection and never answers blocks it forever. What
  we take from torchvision is its User-Agent and its md5 helper.
- **No debris.** Files are written under unique hidden ``.part`` names beside their target
  (:class:`Staging`) and renamed into place only once verified. Any exception, Ctrl-C or
  ``SIGTERM`` (a cluster scheduler's or Snakemake's kill; a handler that raises is installed
  for the duration) deletes them. A run killed harder than that (``SIGKILL``, power loss) leaves
  a ``.part`` that the next staging in that folder sweeps (:func:`sweep_stale_parts`).
- **Say whose file is wrong.** A checksum failure on a file the user put there says so and
  leaves it alone; one on a fresh download names the URL and deletes what was fetched
  (:func:`preplaced_mismatch`, :func:`download_mismatch`).

The module is named ``fetch`` rather than ``download`` because ``msr.data.download`` is the
public function of the package's API.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from msr.data.base import DatasetError, TooLarge

# Read at call time (tests shorten them).
TIMEOUT_S = 60.0  # per socket operation (connect, each read): "no byte for a minute" = dead
TRIES = 3
BACKOFF_S = 2.0  # sleep BACKOFF_S * 2**(k-1) after failed try k
# A .part whose owner cannot be checked (another host, or a name we did not write) is stale
# once it is this old; one of this host whose process is gone is stale at once.
STALE_PART_AGE_S = 24 * 3600.0

_CHUNK = 1 << 20


class DownloadFailed(DatasetError):
    """All tries of one URL failed (network error, timeout, HTTP error); ``reason`` says how."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"download of {url} failed: {reason}")
        self.url = url
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def md5_file(path: str | Path) -> str:
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(str(path), chunk_size=_CHUNK)


def preplaced_mismatch(path: Path, what: str, detail: str) -> DatasetError:
    """The error for a file the user (or an earlier run) put in place: it is left untouched.

    ``detail`` says what was expected and found, e.g. ``"expected md5 X, got Y"``.
    """
    return DatasetError(
        f"your file {path} does not match {what} ({detail}); delete it or replace it with a "
        f"good copy"
    )


def download_mismatch(url: str, what: str, detail: str) -> DatasetError:
    """The error for a file we just fetched (deleted by the caller's staging)."""
    return DatasetError(
        f"downloaded from {url}: {what} does not match ({detail}); the download was deleted "
        f"(a broken mirror or transfer - try again later)"
    )


# --------------------------------------------------------------------------------------------
# Staging: temp names beside the target, SIGTERM -> exception, stale-part sweep
# --------------------------------------------------------------------------------------------


class Terminated(SystemExit):
    """Raised by the SIGTERM handler while a :class:`Staging` is open.

    A ``SystemExit`` (exit status 128 + SIGTERM, as if killed) so that every ``finally`` on the
    way out runs - deleting the partial files - and no ``except Exception`` swallows it.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` instead of killing the process.

    Only the main thread may set signal handlers; elsewhere this does nothing (the default
    action then kills the process and the next run sweeps the ``.part`` files).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _owner_tag() -> str:
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    return f"{host}-{os.getpid()}"


def part_name(target: Path) -> Path:
    """``.<name>.<host>-<pid>-<random>.part`` beside ``target``: unique per writer, and its
    owner can be checked later (see :func:`sweep_stale_parts`)."""
    return target.with_name(f".{target.name}.{_owner_tag()}-{uuid.uuid4().hex[:12]}.part")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_parts(folder: Path, *, max_age_s: float | None = None) -> list[Path]:
    """Delete ``.part`` files of earlier runs that were killed too hard to clean up.

    A part is stale when it was written on this host by a process that no longer exists, or
    (owner unknown: another host on a shared folder, an unrecognised name) when it is older
    than ``max_age_s`` (default :data:`STALE_PART_AGE_S`). A concurrent live download in the
    same folder is never touched. Returns the deleted paths.
    """
    if not folder.is_dir():
        return []
    max_age = STALE_PART_AGE_S if max_age_s is None else max_age_s
    host = _owner_tag().rsplit("-", 1)[0]
    removed = []
    for part in folder.glob(".*.part"):
        owner = part.name[: -len(".part")].rsplit(".", 1)[-1].split("-")
        try:
            if len(owner) == 3 and owner[0] == host:
                stale = int(owner[1]) != os.getpid() and not _pid_alive(int(owner[1]))
            else:
                stale = time.time() - part.stat().st_mtime > max_age
            if stale:
                part.unlink()
                removed.append(part)
        except (OSError, ValueError):
            continue  # vanished meanwhile, or a name we cannot read: leave it
    return removed


class Staging:
    """Temp files beside their targets that become real only on :meth:`commit`.

    ``with Staging(folder) as stage: tmp = stage.temp(target); ...; stage.commit()``. Leaving
    the block without a commit (an error, Ctrl-C, SIGTERM) deletes every temp file and, with
    ``tidy``, ``folder`` itself if this staging created it and it is still empty - so a failed
    attempt leaves a dataset's folder as it found it. Entering sweeps stale ``.part`` files of
    killed earlier runs.
    """

    def __init__(self, folder: str | Path, *, tidy: bool = True) -> None:
        self.folder = Path(folder)
        self.tidy = tidy
        self._temps: dict[Path, Path] = {}
        self._created = False
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> Staging:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_parts(self.folder)
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_raises())
        return self

    def temp(self, target: Path) -> Path:
        """A fresh ``.part`` path for ``target`` (which must be in this staging's folder)."""
        if target.parent != self.folder:
            raise ValueError(f"{target} is not in the staging folder {self.folder}")
        tmp = part_name(target)
        self._temps[tmp] = target
        return tmp

    def commit(self) -> None:
        """Rename every temp file onto its target (each rename is atomic)."""
        for tmp, target in list(self._temps.items()):
            os.replace(tmp, target)
            del self._temps[tmp]

    def __exit__(self, *exc: object) -> None:
        try:
            for tmp in self._temps:
                tmp.unlink(missing_ok=True)
            self._temps.clear()
            if self.tidy and self._created:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only if empty: never removes anyone's files
        finally:
            if self._signals is not None:
                self._signals.close()


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


class _ShortRead(OSError):
    """The server closed the connection before sending Content-Length bytes."""


def _transient(url: str, exc: BaseException) -> bool:
    """Worth another try: timeouts, dropped connections, server-side (5xx) or rate-limit errors.
    Not: client errors (404, 403), bad URLs, anything about a local ``file://`` path."""
    if urllib.parse.urlparse(url).scheme == "file":
        return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, OSError)
    import http.client

    return isinstance(exc, (TimeoutError, ConnectionError, _ShortRead, http.client.HTTPException))


def _fetch_once(url: str, dest: Path, timeout: float, max_bytes: int | None) -> None:
    from torchvision.datasets.utils import USER_AGENT
    from tqdm import tqdm

    limit = math.inf if max_bytes is None else max_bytes
    too_large = f"more than {max_bytes} bytes, the most the file asked for can be"
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        # http.client counts Content-Length down as it reads; file:// responses have none
        expected = getattr(response, "length", None)
        if expected is not None and expected > limit:
            raise TooLarge(f"the server announces {expected} bytes: {too_large}")
        with dest.open("wb") as out, tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            desc=Path(urllib.parse.urlparse(url).path).name or url,
            disable=None,  # no bar in logs (not a terminal)
            file=sys.stderr,
        ) as bar:
            received = 0
            # read1: whatever has arrived (up to a chunk), so the file grows as data come in
            read = getattr(response, "read1", response.read)
            while chunk := read(_CHUNK):
                received += len(chunk)
                if received > limit:  # a server that sends on and on never fills the disk
                    raise TooLarge(f"the server sent {too_large}")
                out.write(chunk)
                bar.update(len(chunk))
        missing = getattr(response, "length", None)
        if expected is not None and missing:
            # http.client returns b"" (no error) when the server closes early
            raise _ShortRead(f"connection closed after {received} of {expected} bytes")


def fetch(
    url: str,
    dest: str | Path,
    *,
    timeout: float | None = None,
    tries: int | None = None,
    backoff: float | None = None,
    max_bytes: int | None = None,
) -> None:
    """Download ``url`` (http, https or file) to ``dest``; raise :class:`DownloadFailed`.

    ``dest`` should be a :meth:`Staging.temp` path: it is overwritten on each try and deleted
    when all tries fail. Transient failures (see :func:`_transient`) are retried up to
    ``tries`` times in all; each socket operation gives up after ``timeout`` seconds. More than
    ``max_bytes`` (the largest the expected file can be) fails at once, without a retry.
    """
    dest = Path(dest)
    timeout = TIMEOUT_S if timeout is None else float(timeout)
    tries = TRIES if tries is None else int(tries)
    backoff = BACKOFF_S if backoff is None else float(backoff)
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    errors: list[str] = []
    try:
        for attempt in range(1, tries + 1):
            try:
                _fetch_once(url, dest, timeout, max_bytes)
                return
            except Exception as exc:
                dest.unlink(missing_ok=True)
                reason = getattr(exc, "reason", exc)  # URLError wraps the socket's error
                kind = "timed out" if isinstance(reason, TimeoutError) else type(exc).__name__
                errors.append(f"try {attempt}: {kind}: {exc}")
                if attempt == tries or not _transient(url, exc):
                    break
                time.sleep(backoff * 2 ** (attempt - 1))
    except BaseException:
        dest.unlink(missing_ok=True)  # Ctrl-C / SIGTERM mid-transfer or mid-backoff
        raise
    raise DownloadFailed(
        url, f"{len(errors)} of {tries} tries, timeout {timeout:g} s per read ({'; '.join(errors)})"
    )


# --------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------


def extract_tar(archive: Path, raw: Path, folder: str, *, max_bytes: int) -> None:
    """Extract into a temp folder next to the target, then move ``folder`` into place.

    Only regular files and folders are extracted, through Python's ``data`` filter (which refuses
    absolute paths, ``..``, links and device files), and no more than ``max_bytes`` in all
    (counted from the member headers before each is written): a :class:`TooLarge` error
    otherwise. On any error the temp folder goes, so nothing is left behind.
    """
    written = 0

    def only_files(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        nonlocal written
        member = tarfile.data_filter(member, dest)
        if not (member.isfile() or member.isdir()):
            kind = "a link" if member.issym() or member.islnk() else "a special file"
            raise DatasetError(f"{archive}: member {member.name!r} is {kind}; an official archive holds only files and folders")
        written += member.size if member.isfile() else 0
        if written > max_bytes:
            raise TooLarge(f"{archive}: extracts to more than {max_bytes} bytes, more than the official "
                           f"archive holds; stopped at member {member.name!r} and removed what was extracted")
        return member

    tmp = Path(tempfile.mkdtemp(dir=raw, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter=only_files)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"{archive}: cannot extract ({exc})") from exc
        if not (tmp / folder).is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise DatasetError(f"{archive}: expected a top-level folder {folder!r}, found {found}")
        try:
            os.replace(tmp / folder, raw / folder)
        except OSError:
            if not (raw / folder).is_dir():
                raise
            # another process finished extracting the same verified archive first: keep that
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
