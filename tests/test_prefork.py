"""The fork server (msr.infra.prefork): a run started through it is the run a fresh process trains,
bitwise; exit codes, output and stop signals pass through; without a server `msr train` runs
on its own."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msr.infra import prefork

MSR = [sys.executable, "-m", "msr"]
RUN = ["train", "--dataset", "digits", "--arch", "resnet8", "--image-size", "8", "--threads", "1",
       "--probe-every", "20"]
TIMING = {"seconds", "images_per_s"}  # wall-clock columns: the only ones allowed to differ


def metrics_without_timing(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def server(tmp_path):
    """A running server; yields (its Popen, the environment that routes `msr train` to it)."""
    path = tmp_path / "server.sock"
    proc = subprocess.Popen([*MSR, "prefork", "--serve", str(path)])
    wait_until(lambda: path.exists() or proc.poll() is not None, 120, "the server's socket")
    assert proc.poll() is None, "the server exited at start"
    # the allocation the server runs in, as `msr prefork` records it (tests run inside a Slurm job too)
    yield proc, {**os.environ, "MSR_PREFORK_SOCKET": str(path), prefork.ENV_ALLOCATION: prefork._allocation(os.environ)}
    proc.terminate()
    proc.wait(timeout=30)
    assert not path.exists(), "the server left its socket behind"


def test_a_run_through_the_server_is_bitwise_the_run_of_a_fresh_process(tmp_path, server):
    _, env = server
    # msr_noise: the model draws noise from torch's global RNG every step, so a server whose RNG
    # state leaked into its jobs would show here
    args = [*RUN, "--variant", "msr_noise", "--epochs", "2"]
    direct = subprocess.run([*MSR, *args, "--out", str(tmp_path / "direct")], capture_output=True, text=True)
    forked = subprocess.run([*MSR, *args, "--out", str(tmp_path / "forked")], capture_output=True, text=True,
                            env=env)
    assert direct.returncode == 0, direct.stderr
    assert forked.returncode == 0, forked.stderr
    assert "no prefork server" not in forked.stderr
    assert "completed" in forked.stdout  # the job's output reached the client's stdout
    assert metrics_without_timing(tmp_path / "forked") == metrics_without_timing(tmp_path / "direct")
    a = torch.load(tmp_path / "direct" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "forked" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])


def test_errors_and_exit_codes_pass_through(tmp_path, server):
    _, env = server
    bad = subprocess.run([*MSR, *RUN, "--variant", "no_such_variant", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "no_such_variant" in bad.stderr and "valid variants" in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_client_stops_its_job(tmp_path, server, sig):
    proc, env = server
    out = tmp_path / "long"
    client = subprocess.Popen([*MSR, *RUN, "--variant", "msr", "--epochs", "500", "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (out / "metrics.csv").exists(), 120, "the job's first epoch")
    handlers = children(proc.pid)
    jobs = [job for handler in handlers for job in children(handler)]
    assert len(handlers) == 1 and len(jobs) == 1, (handlers, jobs)
    client.send_signal(sig)
    client.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert client.returncode == 128 + signal.SIGTERM  # the job's own death by SIGTERM, relayed
    wait_until(lambda: not os.path.exists(f"/proc/{jobs[0]}") or _zombie(jobs[0]), 60, "the job to stop")
    assert not (out / "summary.json").exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_without_a_server_train_runs_in_its_own_process(tmp_path):
    env = {**os.environ, "MSR_PREFORK_SOCKET": str(tmp_path / "nobody-listens.sock")}
    done = subprocess.run([*MSR, *RUN, "--variant", "msr", "--epochs", "1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "no prefork server" in done.stderr
    assert (tmp_path / "r" / "summary.json").exists()


def test_prefork_runs_the_command_with_the_socket_set_and_returns_its_status(tmp_path):
    script = "import os, sys; print(os.environ['MSR_PREFORK_SOCKET']); sys.exit(3)"
    done = subprocess.run([*MSR, "prefork", "--socket-dir", str(tmp_path), "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, done.stderr
    socket_path = Path(done.stdout.strip())
    assert socket_path.parent.parent == tmp_path
    assert not socket_path.parent.exists(), "the server's folder outlived the command"


def test_prefork_without_a_command_is_an_error():
    done = subprocess.run([*MSR, "prefork"], capture_output=True, text=True)
    assert done.returncode == 2 and "no COMMAND" in done.stderr
