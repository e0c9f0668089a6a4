"""GPU-slot claiming (msr.infra.gpu) with fake GPU ids and real, concurrent claimant processes.

No GPU is needed: a claim only takes locks and sets CUDA_VISIBLE_DEVICES. Every wait is bounded
by a timeout; nothing asserts on how long anything took.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from msr.infra import gpu

WAIT_S = 30.0  # generous bound for a claimant to answer on a loaded 2-core machine

CLAIMANT = """
import json, os, sys
from msr.infra.gpu import claim_gpu_slot
slot = claim_gpu_slot(int(sys.argv[1]), poll_s=0.05, max_poll_s=0.2, timeout_s=float(sys.argv[2]))
print(json.dumps({"pid": os.getpid(), "gpu": slot.gpu_id, "slot": slot.slot,
                  "cvd": os.environ["CUDA_VISIBLE_DEVICES"]}), flush=True)
sys.stdin.read()  # hold the slot until the test closes our stdin (or kills us)
"""


def _env(lock_dir: Path, ids: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "MSR_PREFORK_SOCKET")}
    env.update(MSR_GPU_IDS=ids, MSR_GPU_LOCK_DIR=str(lock_dir))
    return env


class Claimant:
    """A process that claims a slot, reports it on stdout and holds it until told to stop."""

    def __init__(self, lock_dir: Path, ids: str, k: int, timeout_s: float = WAIT_S):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, str(k), str(timeout_s)], env=_env(lock_dir, ids),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=q: [q.put(line) for line in s], daemon=True).start()

    def claimed(self, timeout: float = WAIT_S) -> dict:
        try:
            return json.loads(self.out.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"claimant {self.proc.pid} reported no slot within {timeout} s") from None

    def has_claimed(self) -> bool:
        return not self.out.empty()

    def stderr_line(self, timeout: float = WAIT_S) -> str:
        return self.err.get(timeout=timeout)

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=WAIT_S)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)


@pytest.fixture
def claimants():
    started: list[Claimant] = []
    yield started
    for c in started:
        c.stop()


def test_concurrent_claimants_get_distinct_slots_at_most_k_per_gpu(tmp_path, claimants):
    claimants += [Claimant(tmp_path, "0,1", k=2) for _ in range(4)]  # started together
    got = [c.claimed() for c in claimants]
    pairs = {(g["gpu"], g["slot"]) for g in got}
    assert pairs == {("0", 0), ("0", 1), ("1", 0), ("1", 1)}  # distinct, every slot < K
    for g in got:
        assert g["cvd"] == g["gpu"]  # the child's CUDA_VISIBLE_DEVICES is its claimed id
        # the held file names its holder (for people reading the lock folder)
        assert f"pid={g['pid']} " in (tmp_path / f"gpu{g['gpu']}.slot{g['slot']}.lock").read_text()


def test_claims_spread_over_gpus_before_stacking(tmp_path, claimants):
    first = Claimant(tmp_path, "0,1", k=3)
    claimants.append(first)
    a = first.claimed()
    second = Claimant(tmp_path, "0,1", k=3)
    claimants.append(second)
    b = second.claimed()
    assert (a["gpu"], a["slot"]) == ("0", 0) and (b["gpu"], b["slot"]) == ("1", 0)


def test_least_loaded_gpu_wins_over_a_free_low_slot(tmp_path):
    # GPU 0 has slot 0 free but slots 1 and 2 busy; GPU 1 has one busy slot: GPU 1 is less loaded
    held = []
    for name in ("gpu0.slot1.lock", "gpu0.slot2.lock", "gpu1.slot0.lock"):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fd)
    try:
        slot = gpu.claim_gpu_slot(3, ids=["0", "1"], lock_dir=tmp_path, set_env=False, timeout_s=5)
        try:
            assert (slot.gpu_id, slot.slot) == ("1", 1)
        finally:
            slot.release()
        assert not slot.held
    finally:
        for fd in held:
            os.close(fd)


def test_a_killed_holder_frees_its_slot_for_a_waiter(tmp_path, claimants):
    holders = [Claimant(tmp_path, "0,1", k=1) for _ in range(2)]
    claimants += holders
    got = [h.claimed() for h in holders]
    waiter = Claimant(tmp_path, "0,1", k=1)
    claimants.append(waiter)
    assert "waiting for one to free" in waiter.stderr_line()  # it saw every slot held
    assert not waiter.has_claimed()
    holders[1].kill9()  # no cleanup runs in the holder: the kernel drops its flock
    w = waiter.claimed()
    assert (w["gpu"], w["slot"]) == (got[1]["gpu"], got[1]["slot"]) and w["cvd"] == got[1]["gpu"]


def test_a_holder_that_exits_normally_frees_its_slot(tmp_path, claimants):
    holder = Claimant(tmp_path, "7", k=1)
    claimants.append(holder)
    assert holder.claimed()["gpu"] == "7"
    waiter = Claimant(tmp_path, "7", k=1)
    claimants.append(waiter)
    assert "waiting" in waiter.stderr_line()
    holder.release()
    assert waiter.claimed() == {"pid": waiter.proc.pid, "gpu": "7", "slot": 0, "cvd": "7"}


def test_waiting_is_bounded_by_the_timeout(tmp_path):
    fd = os.open(tmp_path / "gpu0.slot0.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        lines: list[str] = []
        with pytest.raises(gpu.GpuSlotError, match="no free GPU slot after"):
            gpu.claim_gpu_slot(1, ids=["0"], lock_dir=tmp_path, set_env=False, poll_s=0.05, timeout_s=0.3, log=lines.append)
        assert len(lines) == 1 and str(tmp_path) in lines[0]
    finally:
        os.close(fd)


def test_ids_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MSR_GPU_IDS", " 2, 3 ")
    assert gpu.visible_gpu_ids() == ["2", "3"]
    monkeypatch.delenv("MSR_GPU_IDS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,-1,6")  # CUDA ignores entries after an invalid one
    assert gpu.visible_gpu_ids() == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.visible_gpu_ids() == []


@pytest.mark.parametrize(
    ("text", "message"),
    [("0,,1", "empty GPU id"), ("0,0", "appears twice"), ("0,../x", "characters other than")],
)
def test_bad_ids_are_named(text, message):
    with pytest.raises(gpu.GpuSlotError, match=message):
        gpu.parse_ids(text, "MSR_GPU_IDS")


def test_claim_for_run_is_a_no_op_off_the_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("MSR_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("MSR_GPU_IDS", "0")
    lines: list[str] = []
    assert gpu.claim_for_run(0, "cuda", log=lines.append) is None and not lines  # K=0: off
    assert gpu.claim_for_run(2, "cpu", log=lines.append) is None
    assert "ignored" in lines[-1] and "--device cpu" in lines[-1]
    monkeypatch.delenv("MSR_GPU_IDS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.claim_for_run(2, "auto", log=lines.append) is None
    assert "no GPU is visible" in lines[-1]
    assert not (tmp_path / "locks").exists()
    with pytest.raises(gpu.GpuSlotError, match="no GPU ids"):
        gpu.claim_for_run(2, "cuda", log=lines.append)
    with pytest.raises(gpu.GpuSlotError, match=">= 0"):
        gpu.claim_for_run(-1, "cuda", log=lines.append)


def _msr_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = _env(tmp_path / "locks", "fake7")  # an id no CUDA runtime knows: no device can start
    return subprocess.run(
        [sys.executable, "-m", "msr", "train", "--out", str(tmp_path / "run"), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_msr_train_claims_before_cuda_is_checked(tmp_path):
    done = _msr_train(tmp_path, "--gpu-slots", "2", "--device", "cuda", "--progress", "lines")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    # the claim came first, then validation found no usable CUDA device behind the claimed id
    assert "claimed GPU fake7 slot 0 of 2 (CUDA_VISIBLE_DEVICES=fake7" in lines[0]
    assert lines[-1].startswith("msr train: error:") and "cuda" in lines[-1].lower()
    assert not (tmp_path / "run").exists()


def test_msr_train_gpu_slots_with_cpu_device_claims_nothing(tmp_path):
    done = _msr_train(tmp_path, "--gpu-slots", "2", "--device", "cpu", "--epochs", "0")
    assert done.returncode == 2  # stopped by the bad epochs, after the slot option was handled
    assert "--gpu-slots ignored" in done.stderr and "epochs" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "locks").exists()
    bad = _msr_train(tmp_path, "--gpu-slots", "-1", "--device", "cuda")
    assert bad.returncode == 2 and "--gpu-slots must be an integer >= 0" in bad.stderr


def test_a_lock_file_that_cannot_be_opened_is_one_named_error(tmp_path):
    (tmp_path / "gpu0.slot0.lock").mkdir()  # unopenable for writing, even by root (unlike a chmod)
    with pytest.raises(gpu.GpuSlotError, match="cannot open the GPU lock file .*gpu0.slot0.lock"):
        gpu.claim_gpu_slot(1, ids=["0"], lock_dir=tmp_path, set_env=False, timeout_s=1)
