"""msr.data.fetch: downloads never hang, never leave debris, and say whose file is wrong.

Servers run on 127.0.0.1 only, in this process (threads) with every wait bounded; the SIGTERM
case kills a real subprocess mid-transfer. Timeouts and backoff are shortened for the tests.
"""

from __future__ import annotations

import hashlib
import http.server
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from datagen import write_cifar_batches

from msr import data
from msr.data import DatasetError, cifar, fashion_mnist, fetch

STALL_LIMIT_S = 30.0  # a stalling handler gives up after this, so no thread outlives a test


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/ok/NAME`` serves ``files[NAME]``; ``/bad/NAME`` wrong bytes; ``/short/NAME`` closes
    after 10 of 1000 announced bytes; ``/flaky/NAME`` fails (500) on its first request, then
    serves; ``/stall/NAME`` sends 64 KiB of 50 MB and waits (for ``release``)."""

    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        _, mode, name = self.path.split("/", 2)
        count = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if mode == "ok":
            self._send(self.files[name])
        elif mode == "bad":
            self._send(b"these are not the bytes you are looking for")
        elif mode == "short":
            self._send(b"x" * 10, length=1000)
            self.close_connection = True
        elif mode == "flaky" and count == 1:
            self.send_error(500, "try again")
        elif mode == "flaky":
            self._send(self.files[name])
        elif mode == "stall":
            self._send(b"\0" * 65536, length=50_000_000)
            self.release.wait(STALL_LIMIT_S)
            self.close_connection = True
        else:
            self.send_error(404)


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"files": {}, "hits": {}, "release": threading.Event()})
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    except OSError as exc:  # pragma: no cover - sandbox without loopback
        pytest.skip(f"cannot bind a loopback HTTP server: {exc}")
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel completes the handshake) and never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
    except OSError as exc:  # pragma: no cover
        pytest.skip(f"cannot bind on loopback: {exc}")
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.01)
    monkeypatch.setattr(fetch, "TRIES", 3)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _archive(tmp_path: Path) -> tuple[bytes, str]:
    src = write_cifar_batches(tmp_path / "archive-src", kind="cifar10", n_train=10, n_test=4)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    raw = path.read_bytes()
    return raw, hashlib.md5(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# No hang, bounded retries
# --------------------------------------------------------------------------------------------


def test_server_that_never_answers_times_out(
    tmp_path: Path, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{silent_server}/cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar, "CIFAR10_URL", url)
    before = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        data.download("cifar10", tmp_path)
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert url in msg and "3 of 3 tries" in msg and msg.count("timed out") >= 3
    assert cifar.CIFAR10_MD5 in msg
    assert elapsed < 60  # 3 x 0.3 s + backoff; the bound only proves it did not hang
    assert _files(tmp_path / "raw") == []  # no .part left
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_short_transfer_is_retried_then_reported(tmp_path: Path, server) -> None:
    base, handler = server
    dest = tmp_path / ".x.part"
    with pytest.raises(fetch.DownloadFailed, match="connection closed after 10 of 1000 bytes") as info:
        fetch.fetch(f"{base}/short/x", dest, tries=2)
    assert "2 of 2 tries" in str(info.value)
    assert handler.hits == {"/short/x": 2} and not dest.exists()


def test_transient_failure_is_retried(tmp_path: Path, server) -> None:
    base, handler = server
    handler.files["a.bin"] = b"payload" * 1000
    dest = tmp_path / "a.bin"
    fetch.fetch(f"{base}/flaky/a.bin", dest)
    assert dest.read_bytes() == b"payload" * 1000 and handler.hits == {"/flaky/a.bin": 2}


def test_client_errors_are_not_retried(tmp_path: Path, server) -> None:
    base, handler = server
    with pytest.raises(fetch.DownloadFailed, match="1 of 3 tries.*404"):
        fetch.fetch(f"{base}/missing/a.bin", tmp_path / "a.bin")
    assert handler.hits == {"/missing/a.bin": 1}
    # a local file:// source that is not there will not appear by waiting either
    with pytest.raises(fetch.DownloadFailed, match="1 of 3 tries"):
        fetch.fetch((tmp_path / "nowhere.bin").as_uri(), tmp_path / "b.bin", backoff=60)


# --------------------------------------------------------------------------------------------
# Whose file is wrong
# --------------------------------------------------------------------------------------------


def test_server_serving_bad_bytes_names_the_url(
    tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, handler = server
    _, official_md5s = fashion_mnist.official_sources()  # torchvision's constants, no network
    monkeypatch.setattr(fashion_mnist, "official_sources", lambda: ([f"{base}/bad/"], official_md5s))
    monkeypatch.setattr(fashion_mnist, "DEFAULT_MIRROR", str(tmp_path / "no-mirror"))
    with pytest.raises(DatasetError) as info:
        data.download("fashion_mnist", tmp_path / "root")
    msg = str(info.value)
    name = "train-images-idx3-ubyte.gz"
    bad_md5 = hashlib.md5(b"these are not the bytes you are looking for").hexdigest()
    assert f"downloaded from {base}/bad/{name}" in msg
    assert official_md5s[name] in msg and bad_md5 in msg and "the download was deleted" in msg
    assert "your file" not in msg
    assert _files(tmp_path / "root" / "raw") == []
    assert handler.hits == {f"/bad/{name}": 1}  # a wrong checksum is not retried on one mirror


def test_preplaced_bad_archive_is_the_users_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    mine = raw / "cifar-10-python.tar.gz"
    mine.write_bytes(b"an old or partial copy")
    monkeypatch.setattr(fetch, "fetch", pytest.fail)
    with pytest.raises(DatasetError) as info:
        data.download("cifar10", tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"your file {mine} does not match the official cifar10 archive")
    assert cifar.CIFAR10_MD5 in msg and hashlib.md5(b"an old or partial copy").hexdigest() in msg
    assert msg.endswith("delete it or replace it with a good copy")
    assert "downloaded from" not in msg
    assert mine.read_bytes() == b"an old or partial copy" and _files(raw) == [mine.name]


def test_good_archive_over_http_is_verified_and_extracted(
    tmp_path: Path, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, handler = server
    handler.files["cifar-10-python.tar.gz"], md5 = _archive(tmp_path)
    monkeypatch.setattr(cifar, "CIFAR10_URL", f"{base}/ok/cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
    data.download("cifar10", tmp_path / "root")
    assert _files(tmp_path / "root" / "raw") == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


# --------------------------------------------------------------------------------------------
# No debris: interrupts, SIGTERM, stale parts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt, KeyboardInterrupt),  # Ctrl-C: cleaned up, not rewrapped
        (fetch.Terminated, SystemExit),  # what the SIGTERM handler raises
        (RuntimeError, DatasetError),  # anything else: reported as a failed download
    ],
)
def test_any_exception_mid_transfer_removes_the_part(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: type[BaseException],
    expected: type[BaseException],
) -> None:
    seen: list[Path] = []

    def half_then_fail(url: str, dest: Path, timeout: float, max_bytes: int | None) -> None:
        dest.write_bytes(b"half an archive")
        seen.append(dest)
        raise error()

    monkeypatch.setattr(fetch, "_fetch_once", half_then_fail)
    with pytest.raises(expected):
        data.download("cifar10", tmp_path)
    assert seen and seen[0].name.endswith(".part") and seen[0].parent == tmp_path / "raw"
    assert _files(tmp_path / "raw") == []


_CHILD = """
import sys
from msr import data
from msr.data import cifar, fetch
cifar.CIFAR10_URL = sys.argv[1]
fetch.TIMEOUT_S = 60.0
data.download("cifar10", sys.argv[2])
"""


def test_sigterm_mid_download_removes_the_part(tmp_path: Path, server) -> None:
    base, _ = server
    raw = tmp_path / "raw"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, f"{base}/stall/cifar-10-python.tar.gz", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120  # importing torch on a loaded machine can be slow
        parts: list[Path] = []
        while time.monotonic() < deadline and child.poll() is None:
            parts = [p for p in raw.glob(".*.part") if p.stat().st_size > 0] if raw.is_dir() else []
            if parts:
                break
            time.sleep(0.05)
        assert parts, f"no partial download appeared (exit {child.poll()}): {child.stderr.read1() if child.poll() is not None else ''}"
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert code == 128 + signal.SIGTERM, child.stderr.read().decode()
    assert _files(raw) == []  # the .part is gone, nothing else was made


def test_stale_parts_of_killed_runs_are_swept_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    raw = tmp_path / "raw"
    raw.mkdir()
    host = fetch._owner_tag().rsplit("-", 1)[0]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    old = time.time() - 2 * fetch.STALE_PART_AGE_S
    names = {
        "dead": f".cifar-10-python.tar.gz.{host}-{dead_pid}-0123456789ab.part",
        "live": f".cifar-10-python.tar.gz.{host}-{os.getppid()}-0123456789ab.part",
        "other-host-fresh": ".cifar-10-python.tar.gz.elsewhere-12345-0123456789ab.part",
        "other-host-old": ".cifar-10-python.tar.gz.elsewhere-12346-0123456789ab.part",
        "old-style-old": ".cifar-10-python.tar.gz.0f1e2d3c4b5a69788796a5b4c3d2e1f0.part",
    }
    for key, name in names.items():
        (raw / name).write_bytes(b"partial")
        if key.endswith("-old"):
            os.utime(raw / name, (old, old))
    archive, md5 = _archive(tmp_path)
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "cifar-10-python.tar.gz").write_bytes(archive)
    monkeypatch.setattr(cifar, "CIFAR10_URL", (tmp_path / "server" / "cifar-10-python.tar.gz").as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", md5)
    data.download("cifar10", tmp_path)
    kept = {names["live"], names["other-host-fresh"]}
    assert _files(raw) == sorted(kept | {"cifar-10-batches-py", "cifar-10-python.tar.gz"})
