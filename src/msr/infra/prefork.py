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

Process layout:

    msr prefork ── command (snakemake) ── ... ── client (`msr train`, no torch)
         └─ server (torch imported, never runs a torch op)
               └─ handler per client: forks the job, relays its exit status, relays a stop
                     └─ job: the real `msr train`, on the client's fds, cwd and environment

Forking a process that has threads copies only the forking thread; a lock another thread held
at that moment stays locked forever in the child. The server is not single-threaded: numpy's
OpenBLAS starts its worker pool when imported (cores - 1 idle threads; measured: 2 threads on
a 2-core machine). Forking it is safe anyway because (1) the server's own code runs in one
thread and starts none, so no Python-level lock is held elsewhere at a fork; (2) OpenBLAS
registers ``pthread_atfork`` handlers and starts a fresh pool in the child at its first BLAS
call (measured: a job has 1 thread right after the fork and 2 after a matmul); (3) torch starts
its intra-op and inter-op pools lazily, at the first parallel op - the server runs none - and
CUDA is never initialized in the server. The remaining risk is a library that starts a thread
at import which holds a C-level lock (malloc's, for one) at the instant of a fork; the job would
then hang at its first use of that lock. Runs through the server are checked bitwise against
fresh processes (tests/test_prefork.py); ``make run PREFORK=`` turns the server off.

Trust and failure, written as if another local user were hostile:
- The socket lives in a fresh ``0700`` folder (``tempfile.TemporaryDirectory``). The server
  also checks every connection's peer credentials (``SO_PEERCRED``) and refuses other users'
  processes; the client checks that the server runs as its own user before it hands over its
  standard streams.
- A client never waits forever: connecting and the greeting of the handler the server forks
  for it are bounded by ``MSR_PREFORK_TIMEOUT_S`` (default :data:`TIMEOUT_S`); past it - a
  stopped (``SIGSTOP``) or overloaded server - the client says so and runs ``msr train`` in its
  own process. It sends its request (and its standard streams) only after the greeting, so a
  server that wakes up late finds nothing to run, and holds none of the client's streams
  meanwhile (a parent reading them would otherwise wait for the server too). Once the job runs,
  the client watches the job's process as well: if it ends and its status does not follow
  within the timeout (a stopped handler), the client fails with a message instead of waiting.
- The fork server is for jobs on this host. Under a cluster executor (SLURM) the workflow drops
  ``MSR_PREFORK_SOCKET`` before submitting jobs (and ``make run`` starts no server); as a second
  guard, a client inside a scheduler allocation (``SLURM_JOB_ID``, ``PBS_JOBID``, ``LSB_JOBID``)
  refuses a server that does not run inside that same allocation, so a cluster job never trains
  on the submitting host, outside its allocation.

A client that receives SIGTERM/SIGINT/SIGHUP asks its handler to SIGTERM the job and waits for
its end; a client killed outright (SIGKILL) closes its socket, and the handler then stops the
job too, so a run directory never has a writer its Snakemake job no longer knows about.
"""

from __future__ import annotations

import json
import math
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
ENV_TIMEOUT = "MSR_PREFORK_TIMEOUT_S"
# The scheduler allocation `msr prefork` (and so its server) runs in, as _allocation() writes it;
# set by run_with_server for the command's jobs ("" = none).
ENV_ALLOCATION = "MSR_PREFORK_ALLOCATION"
SCHEDULER_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
TIMEOUT_S = 30.0  # connect, acknowledge, relay a status: each far below 1 s when all is well
_HEADER = struct.Struct("!I")  # length of the JSON request that follows the file descriptors
_STATUS = struct.Struct("!i")  # the job's exit code (negative: killed by that signal)
_PID = struct.Struct("!i")  # the job's pid, sent once it is forked
_ACCEPT = b"A"  # handler -> client: a handler is alive for you; send the request
_REFUSE = b"R"  # server -> client: not for you (another user); followed by a reason
_STOP = b"T"  # client -> handler: stop the job (the client got a termination signal)
MAX_REQUEST = 16 << 20  # bytes of argv + cwd + environment; far above any real one
KILL_GRACE_S = 20.0  # SIGTERM, then SIGKILL after this long if the job is still alive
STARTUP_TIMEOUT_S = 120.0


def timeout_from_env() -> float:
    value = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        seconds = float(value) if value else TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        print(f"msr: {ENV_TIMEOUT}={value!r} is not a number of seconds > 0; using {TIMEOUT_S:g}", file=sys.stderr)
        return TIMEOUT_S
    return seconds


def _allocation(env) -> str:
    """The scheduler allocation ``env`` belongs to, e.g. ``SLURM_JOB_ID=123``; "" for none."""
    return ",".join(f"{var}={env[var]}" for var in SCHEDULER_JOB_VARS if env.get(var))


def _peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    creds = struct.Struct("3i")
    pid, uid, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    return pid, uid


# --------------------------------------------------------------------------- client side
def delegate(argv: list[str]) -> int | None:
    """Run ``msr <argv>`` in a process forked by the server; its exit code, or None when no
    server can take it (the caller then runs the command itself, as it would without one)."""
    path = os.environ.get(ENV)
    if not path:
        return None

    def fallback(why: str) -> None:
        print(f"msr: {why}; running in this process", file=sys.stderr, flush=True)

    mine = _allocation(os.environ)
    if mine and os.environ.get(ENV_ALLOCATION) != mine:
        fallback(f"not using the prefork server at {path}: this job runs in the scheduler allocation "
                 f"{mine} and the server outside it (it would train outside the allocation)")
        return None
    timeout = timeout_from_env()
    try:
        sock = _connect(path, timeout)
    except OSError as err:
        fallback(f"no prefork server at {path} ({err.strerror or err})")
        return None
    with sock:
        _, server_uid = _peer_uid(sock)
        if server_uid != os.getuid():
            fallback(f"the prefork server at {path} runs as uid {server_uid}, not as you (uid {os.getuid()}): not using it")
            return None
        try:
            answer = _recv_exact(sock, 1)
        except OSError as err:  # TimeoutError and ConnectionError are OSErrors
            fallback(f"the prefork server at {path} did not answer within {timeout:g} s "
                     f"({'stopped or overloaded?' if isinstance(err, TimeoutError) else err})")
            return None
        if answer != _ACCEPT:
            reason = sock.recv(1000).decode(errors="replace").strip() if answer == _REFUSE else f"answer {answer!r}"
            fallback(f"the prefork server at {path} refused the run ({reason})")
            return None
        # From here on the run is the server's: a failure is reported, never run a second time here.
        env = {k: v for k, v in os.environ.items() if k not in (ENV, ENV_ALLOCATION)}  # the job must not delegate again
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env}).encode()
        streams = [_open_fd(fd) for fd in (0, 1, 2)]
        try:
            socket.send_fds(sock, [_HEADER.pack(len(request))], streams)
            sock.sendall(request)
            job = _PID.unpack(_recv_exact(sock, _PID.size))[0]
        except OSError as err:
            print(f"msr: the prefork server at {path} did not start the run within {timeout:g} s ({err}); "
                  "the run failed (run it again)", file=sys.stderr)
            return 1
        finally:
            for fd, own in zip(streams, (0, 1, 2), strict=True):
                if fd != own:
                    os.close(fd)
        return _wait_for_job(sock, job, timeout)


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected socket; a full listen backlog (EAGAIN) is retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server's queue stayed full for {timeout:g} s") from None
            time.sleep(0.05)
        except BaseException:
            sock.close()
            raise


def _wait_for_job(sock: socket.socket, job: int, timeout: float) -> int:
    """The job's exit code, relayed by its handler. Forwards one stop request on
    SIGTERM/SIGINT/SIGHUP. Waits as long as the job runs (a run takes what it takes), but no
    longer than ``timeout`` after the job's process has ended."""
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
    try:
        ended = os.pidfd_open(job)  # readable once the job has exited (reaped or not)
    except OSError:  # already gone: its status is on its way (or the handler is gone too)
        ended = None
    try:
        data = b""
        deadline = None if ended is not None else time.monotonic() + timeout
        sock.setblocking(False)
        while len(data) < _STATUS.size:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                print(f"msr: the prefork job {job} ended but its server did not report how within "
                      f"{timeout:g} s (a stopped server?); the run failed", file=sys.stderr)
                return 1
            watch = [sock] if deadline is not None else [sock, ended]
            ready, _, _ = select.select(watch, [], [], left)
            if sock in ready:
                chunk = sock.recv(_STATUS.size - len(data))
                if not chunk:
                    print("msr: the prefork server went away before the run ended", file=sys.stderr)
                    return 1
                data += chunk
            elif ready:  # the job has ended: its status should follow at once
                deadline = time.monotonic() + timeout
    finally:
        if ended is not None:
            os.close(ended)
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
            if not admit(conn):
                conn.close()
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


def admit(conn: socket.socket) -> bool:
    """Whether the client is a process of this server's user (``SO_PEERCRED``); another user's
    is told why and refused - it would otherwise run code as this user, on its own streams."""
    pid, uid = _peer_uid(conn)
    if uid == os.getuid():
        return True
    reason = f"the server runs as uid {os.getuid()} and serves only that user, not uid {uid}"
    print(f"msr prefork: refused a client (pid {pid}, uid {uid}): {reason}", file=sys.stderr, flush=True)
    try:
        conn.settimeout(1.0)
        conn.sendall(_REFUSE + reason.encode())
    except OSError:
        pass
    return False


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection mid-message")
        data += chunk
    return data


def _handle(conn: socket.socket, job: Callable[[list[str]], int]) -> None:
    # a client that sends nothing does not hold a handler for long
    conn.settimeout(timeout_from_env())
    fds: list[int] = []
    try:
        conn.sendall(_ACCEPT)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        size = _HEADER.unpack(header)[0] if len(header) == _HEADER.size else -1
        if len(fds) != 3 or not 0 < size <= MAX_REQUEST:
            raise ValueError(f"a malformed request ({len(fds)} streams, {size} bytes)")
        request = json.loads(_recv_exact(conn, size))
    except (OSError, ValueError):  # ConnectionError and TimeoutError are OSErrors
        # the client gave up (it runs the job itself), is gone, or sent no valid request
        for fd in fds:
            os.close(fd)
        return
    conn.settimeout(None)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_job(request, fds, job)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(_PID.pack(pid))
    except OSError:
        pass  # the client is gone: the loop below sees EOF and stops the job
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
    """Start a server, run ``command`` with ``MSR_PREFORK_SOCKET`` (and ``MSR_PREFORK_ALLOCATION``)
    set, stop the server."""
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
            # ENV_ALLOCATION: where the server runs, so a job elsewhere (a cluster job that
            # inherited this environment) knows the server is not in its allocation
            child = subprocess.Popen(command, env={**os.environ, ENV: path, ENV_ALLOCATION: _allocation(os.environ)})

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
