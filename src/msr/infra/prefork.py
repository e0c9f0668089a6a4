"""Start many ``msr train`` processes without paying torch's import each time: a fork server.

Importing torch costs ~2.7 s of CPU per process. The default digits grid trains ~100 runs of
~5 s each, so a third of ``make run`` went to imports. Under

    msr prefork -- snakemake --cores all

a server process imports torch and msr once and listens on a Unix socket named in
``MSR_PREFORK_SOCKET``. Every ``msr train`` that Snakemake then starts finds that variable and,
instead of importing torch, hands the server its argv, working directory, environment and
standard streams (the file descriptors themselves, over the socket). The server forks a process
that runs ``msr train`` exactly as a fresh process would, and the client exits with that
process's exit status. Without the variable, or with no server answering, ``msr train`` runs in
its own process as always - the results are bitwise the same either way (tests/test_prefork.py).

Process layout, all single-threaded (forking a multi-threaded process is unsafe):

    msr prefork ── command (snakemake) ── ... ── client (`msr train`, no torch)
         └─ server (torch imported, never runs a torch op)
               └─ handler per client: forks the job, relays its exit status, relays a stop
                     └─ job: the real `msr train`, on the client's fds, cwd and environment

A client that receives SIGTERM/SIGINT/SIGHUP asks its handler to SIGTERM the job and waits for
its end; a client killed outright (SIGKILL) closes its socket, and the handler then stops the
job too, so a run directory never has a writer its Snakemake job no longer knows about.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENV = "MSR_PREFORK_SOCKET"
_HEADER = struct.Struct("!I")  # length of the JSON request that follows the file descriptors
_STATUS = struct.Struct("!i")  # the job's exit code (negative: killed by that signal)
_STOP = b"T"  # client -> handler: stop the job (the client got a termination signal)
KILL_GRACE_S = 20.0  # SIGTERM, then SIGKILL after this long if the job is still alive
STARTUP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- client side
def delegate(argv: list[str]) -> int | None:
    """Run ``msr <argv>`` in a process forked by the server; its exit code, or None when no
    server answers (the caller then runs the command itself)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        print(f"msr: no prefork server at {path} ({err.strerror}); running in this process", file=sys.stderr)
        return None
    env = {k: v for k, v in os.environ.items() if k != ENV}  # the job must not delegate again
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
    streams = [_open_fd(fd) for fd in (0, 1, 2)]
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request))], streams)
        sock.sendall(request)
    finally:
        for fd, own in zip(streams, (0, 1, 2), strict=True):
            if fd != own:
                os.close(fd)

    stop_sent = False

    def stop(signum, frame):  # forward the stop once; the job's own exit status then follows
        nonlocal stop_sent
        if not stop_sent:
            stop_sent = True
            try:
                sock.sendall(_STOP)
            except OSError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    data = b""
    while len(data) < _STATUS.size:
        try:
            chunk = sock.recv(_STATUS.size - len(data))
        except InterruptedError:  # pragma: no cover - PEP 475 retries recv for us
            continue
        if not chunk:
            print("msr: the prefork server went away before the run ended", file=sys.stderr)
            return 1
        data += chunk
    code = _STATUS.unpack(data)[0]
    return 128 - code if code < 0 else code


def _open_fd(fd: int) -> int:
    """``fd`` if it is open, else /dev/null (a job started with a closed stdin)."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


# --------------------------------------------------------------------------- server side
def serve(path: str, job: Callable[[list[str]], int]) -> None:
    """Import what a run needs, then fork a handler per client until the parent goes away.

    ``job`` runs one request's argv in the forked process and returns its exit code: the
    ``msr`` entry point itself (msr.cli.main), handed in by the command that starts the server,
    so this module never imports the command line above it."""
    import random  # noqa: F401 - reseeded in each job below

    import msr.training.loop  # noqa: F401 - the expensive imports, paid once: torch, the model, the data

    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    listener.bind(tmp)
    listener.listen(64)
    os.rename(tmp, path)  # the socket appears only when the server is ready
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while os.getppid() == parent:  # `msr prefork` died without stopping us: stop too
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                try:
                    _handle(conn, job)
                finally:
                    os._exit(0)
            conn.close()
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed the connection mid-request")
        data += chunk
    return data


def _handle(conn: socket.socket, job: Callable[[list[str]], int]) -> None:
    conn.settimeout(None)
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    if len(header) < _HEADER.size or len(fds) != 3:
        return
    request = json.loads(_recv_exact(conn, _HEADER.unpack(header)[0]))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_job(request, fds, job)  # never returns
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    watch, deadline = [conn, pidfd], None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(watch, [], [], timeout)
        if pidfd in ready:
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass  # the client is gone; nobody to tell
            return
        if conn in ready or (deadline is not None and not ready):
            if deadline is None:  # a stop request, or the client died (EOF): stop the job
                conn.recv(1) if conn in ready else None
                watch.remove(conn)
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + KILL_GRACE_S
            elif not ready:  # the grace period is over
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 3600


def _run_job(request: dict, fds: list[int], job: Callable[[list[str]], int]) -> None:
    """In the forked job: become the client's process, run ``msr <argv>``, exit with its code."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # a fresh process draws these from the OS; the server's copies would be shared by all jobs
        import random

        import numpy as np

        random.seed()
        np.random.seed()
        sys.argv = ["msr", *request["argv"]]
        code = job(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - report like an uncaught exception in a fresh process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code if isinstance(code, int) else 1)


# --------------------------------------------------------------------------- msr prefork -- CMD
def run_with_server(command: list[str], socket_dir: str | None = None) -> int:
    """Start a server, run ``command`` with ``MSR_PREFORK_SOCKET`` set, stop the server."""
    with tempfile.TemporaryDirectory(prefix="msr-prefork-", dir=socket_dir) as folder:
        path = os.path.join(folder, "server.sock")
        server = subprocess.Popen([sys.executable, "-m", "msr", "prefork", "--serve", path])
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not os.path.exists(path):
                if server.poll() is not None:
                    print(f"msr prefork: the server exited with status {server.returncode} "
                          "before it was ready; running without it", file=sys.stderr)
                    return subprocess.call(command)
                if time.monotonic() > deadline:
                    print("msr prefork: the server was not ready after "
                          f"{STARTUP_TIMEOUT_S:.0f} s; running without it", file=sys.stderr)
                    return subprocess.call(command)
                time.sleep(0.05)
            child = subprocess.Popen(command, env={**os.environ, ENV: path})

            def forward(signum, frame):
                child.send_signal(signum)

            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, forward)
            while True:
                try:
                    return child.wait()
                except KeyboardInterrupt:  # Ctrl-C reaches the command too; wait for it to stop
                    continue
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
