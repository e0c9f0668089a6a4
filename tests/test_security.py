"""The security audit of issue 17, replayed: one section per finding, each test reproducing the
attack or the mistaken input and asserting the named error or the safe outcome.

1. GPU lock folder: planted links and unsafe folders (msr.infra.gpu)
2. a held GPU slot: a bounded wait that names the holder
3. config strings in shell commands (workflow/rules/*.smk, the config schema)
4. decompression bombs and hostile archives (msr.data)
5. the fork server: peer credentials, timeouts, scheduler allocations (msr.infra.prefork)
6. NaN/Inf, absurd depths, a config without a set name (msr.pipeline.grid, the schema)

Two users are not needed: a "hostile" folder or link is created by this same user, and another
uid is faked by patching ``os.getuid`` where the check compares it. Nothing here waits long:
every wait is bounded by a short timeout, and nothing asserts on how long anything took.
"""

from __future__ import annotations

import copy
import fcntl
import gzip
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from msr import data
from msr.core.models import MAX_DEPTH, parse_arch
from msr.core.variants import get_spec
from msr.data import DatasetError, fashion_mnist, fetch
from msr.data.base import TooLarge
from msr.infra import gpu, prefork
from msr.pipeline import grid

REPO = Path(__file__).resolve().parents[1]
SCHEMA = (REPO / "workflow/schemas/config.schema.yaml").as_posix()
DEFAULT = yaml.safe_load((REPO / "workflow/config/default.yaml").read_text())
MSR = [sys.executable, "-m", "msr"]


def merged(*overlays: dict, check: bool = True) -> dict:
    """default.yaml with overlays deep-merged (as Snakemake does); validated, defaults filled."""

    def merge(base, over):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = copy.deepcopy(DEFAULT)
    for overlay in overlays:
        cfg = merge(cfg, overlay)
    if check:
        validate(cfg, SCHEMA)
    return cfg


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# ============================================================ 1. the GPU lock folder


@pytest.fixture
def gpu_env(tmp_path, monkeypatch) -> Path:
    """A system temp dir of our own (the default lock folder lives in it), one fake GPU id."""
    tmp = tmp_path / "systemp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for var in ("MSR_GPU_LOCK_DIR", "MSR_GPU_WAIT_S", "SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MSR_GPU_IDS", "0")
    return tmp


def _claim(**kwargs) -> gpu.GpuSlot:
    return gpu.claim_gpu_slot(1, ids=["0"], set_env=False, poll_s=0.05, timeout_s=kwargs.pop("timeout_s", 1), **kwargs)


@pytest.mark.parametrize("planted", ["gpu0.slot0.lock", "claim.lock"])
@pytest.mark.parametrize("where", ["default", "explicit"])
def test_f1_a_planted_symlink_never_redirects_a_write(gpu_env, tmp_path, monkeypatch, planted, where):
    # the audit: another user pre-creates the predictable folder with a link to the victim's file
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = gpu.default_lock_dir() if where == "default" else tmp_path / "shared"
    folder.mkdir(mode=0o700)
    (folder / planted).symlink_to(victim)
    if where == "explicit":
        monkeypatch.setenv("MSR_GPU_LOCK_DIR", str(folder))
    with pytest.raises(gpu.GpuSlotError, match=f"{planted} is a symbolic link: refusing to follow it"):
        gpu.claim_for_run(1, "cuda", wait_s=1, log=lambda msg: None)
    assert victim.read_text() == "precious\n"


def test_f1_the_default_folder_is_private_and_its_files_too(gpu_env):
    slot = _claim()
    try:
        folder = gpu.default_lock_dir()
        assert folder.parent == gpu_env and folder.name == f"msr-gpu-locks-{os.getuid()}"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(slot.path.stat().st_mode) == 0o600
        assert f"pid={os.getpid()} " in slot.path.read_text()
    finally:
        slot.release()


def test_f1_inside_a_slurm_allocation_the_folder_is_the_allocations(gpu_env, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert gpu.default_lock_dir() == gpu_env / f"msr-gpu-locks-{os.getuid()}-slurm4242"
    monkeypatch.setenv("SLURM_JOB_ID", "42; rm -rf x")  # not a job id: the plain folder
    assert gpu.default_lock_dir() == gpu_env / f"msr-gpu-locks-{os.getuid()}"


def _other_users_folder(folder: Path, elsewhere: Path) -> None:
    folder.mkdir(mode=0o700)
    os.chown(folder, os.getuid() + 1, -1)


@pytest.mark.parametrize("make, problem", [
    (lambda folder, elsewhere: folder.symlink_to(elsewhere, target_is_directory=True), "it is a symbolic link"),
    (lambda folder, elsewhere: folder.write_text("not a folder"), "it is not a folder"),
    (lambda folder, elsewhere: (folder.mkdir(), folder.chmod(0o777)), "its mode is 0777, not 0700"),
    (lambda folder, elsewhere: (folder.mkdir(), folder.chmod(0o750)), "its mode is 0750, not 0700"),
    pytest.param(_other_users_folder, "it belongs to uid", marks=pytest.mark.skipif(
        os.getuid() != 0, reason="only root can give a folder to another uid")),
])
def test_f1_an_unsafe_default_folder_is_refused_and_left_alone(gpu_env, tmp_path, make, problem):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = gpu.default_lock_dir()
    make(folder, elsewhere)
    before = sorted(os.listdir(folder)) if folder.is_dir() else None
    with pytest.raises(gpu.GpuSlotError, match=f"unsafe GPU lock folder {folder}: {problem}") as err:
        _claim()
    assert "nothing was written" in str(err.value)
    assert list(elsewhere.iterdir()) == []  # nothing went through the link
    if before is not None:
        assert sorted(os.listdir(folder)) == before


def test_f1_a_hard_link_or_a_fifo_is_not_a_lock_file(gpu_env, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "explicit"
    folder.mkdir(mode=0o770)
    os.link(victim, folder / "gpu0.slot0.lock")
    with pytest.raises(gpu.GpuSlotError, match="gpu0.slot0.lock is a hard link to another file: refusing it"):
        _claim(lock_dir=folder)
    assert victim.read_text() == "precious\n"
    (folder / "gpu0.slot0.lock").unlink()
    os.mkfifo(folder / "gpu0.slot0.lock")  # opening it must neither block nor be used
    with pytest.raises(gpu.GpuSlotError, match="gpu0.slot0.lock is not a regular file"):
        _claim(lock_dir=folder)


def test_f1_a_shared_folder_is_group_writable_never_world_writable(gpu_env, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(gpu.GpuSlotError, match="every user may write to it"):
        _claim(lock_dir=shared)
    shared.chmod(0o2770)
    old = os.umask(0o022)  # a umask that would take the group's write bit
    try:
        slot = _claim(lock_dir=shared)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(slot.path.stat().st_mode) == 0o660  # another member can take it next
    finally:
        slot.release()


# ============================================================ 2. a slot held by someone else


def _hold(folder: Path, name: str = "gpu0.slot0.lock") -> int:
    """Hold a slot like another process would: its own open file description, flocked, stamped."""
    folder.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid=4242 host=elsewhere gpu=0 slot=0 since=2026-01-01T00:00:00\x1b[2J\n")
    return fd


def test_f2_a_held_slot_ends_the_wait_in_time_naming_the_holder(gpu_env, monkeypatch):
    fd = _hold(gpu.default_lock_dir())
    try:
        lines: list[str] = []
        with pytest.raises(gpu.GpuSlotError) as err:
            gpu.claim_for_run(1, "cuda", wait_s=0.3, log=lines.append)
        msg = str(err.value)
        assert msg.startswith("no free GPU slot after 0.3 s: all 1 GPU slots (1 GPU(s) x 1) are held")
        assert "gpu0.slot0.lock: pid=4242 host=elsewhere gpu=0 slot=0" in msg  # the holder, named
        assert "\x1b" not in msg  # the stamp may come from another user: printable text only
        assert "--gpu-wait" in msg and "MSR_GPU_WAIT_S" in msg
        assert len(lines) == 1 and "at most 0.3 s" in lines[0] and "pid=4242" in lines[0]
        monkeypatch.setenv("MSR_GPU_WAIT_S", "0.2")  # the environment's deadline when none is given
        with pytest.raises(gpu.GpuSlotError, match="no free GPU slot after 0.2 s"):
            gpu.claim_for_run(1, "cuda", log=lines.append)
    finally:
        os.close(fd)


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_f2_a_bad_deadline_is_named(gpu_env, monkeypatch, value):
    with pytest.raises(gpu.GpuSlotError, match=r"--gpu-wait=.*expected seconds >= 0 \(or inf: no deadline\)"):
        gpu.claim_for_run(1, "cuda", wait_s=value)
    monkeypatch.setenv("MSR_GPU_WAIT_S", value)
    with pytest.raises(gpu.GpuSlotError, match="MSR_GPU_WAIT_S="):
        gpu.claim_for_run(1, "cuda")
    assert gpu.parse_wait("inf", "x") == math.inf and gpu.DEFAULT_WAIT_S > 0


def test_f2_msr_train_gpu_wait_fails_in_time_naming_the_holder(tmp_path):
    folder = tmp_path / "locks"
    fd = _hold(folder)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "MSR_PREFORK_SOCKET")}
        env.update(MSR_GPU_IDS="0", MSR_GPU_LOCK_DIR=str(folder))
        done = subprocess.run([*MSR, "train", "--gpu-slots", "1", "--gpu-wait", "0.5", "--device", "cuda",
                               "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.close(fd)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("msr train: error: no free GPU slot after 0.5 s") and "pid=4242 host=elsewhere" in last
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_f2_the_pipelines_gpu_wait_reaches_its_train_jobs(tmp_path):
    folder = tmp_path / "locks"
    fd = _hold(folder)
    work = _copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "wait.yaml"
    overlay.write_text(yaml.safe_dump({"name": "wait", "train": {"device": "auto"},
                                       "resources": {"runs_per_gpu": 1, "gpu_wait_s": 1},
                                       "lr_selection": {"variants": []}}))  # msr's run needs no selection first
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "MSR_GPU_WAIT_S")}
    env.update(MSR_GPU_IDS="0", MSR_GPU_LOCK_DIR=str(folder))
    run = "results/wait/runs/digits/resnet8/msr/base/seed0"
    try:
        done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile",
                               "workflow/config/smoke.yaml", str(overlay), "--", f"{run}/summary.json"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.close(fd)
    assert done.returncode != 0
    log = (work / "results/wait/logs/train/digits/resnet8/msr/base/seed0.log").read_text()
    assert "no free GPU slot after 1 s" in log and "pid=4242 host=elsewhere" in log


# ============================================================ 3. config strings in shell commands

HOSTILE_ROOT = "my data; touch HACKED #"
HOSTILE_MIRROR = "/srv/a mirror $(touch HACKED2)"


def _copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile",):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("workflow", "notebooks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _arg_after(command: str, option: str) -> str:
    words = shlex.split(command)
    return words[words.index(option) + 1]


def test_f3_a_hostile_path_reaches_every_command_as_one_argument(tmp_path):
    work = _copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "hostile.yaml"
    overlay.write_text(yaml.safe_dump({"name": "hostile", "datasets": ["fashion_mnist"],
                                       "train": {"data_root": HOSTILE_ROOT, "data_mirror": HOSTILE_MIRROR,
                                                 "image_size": None, "overrides": {"noise_dist": "gaussian"}}}))
    done = _snakemake(work, "-n", "-p", "--forceall", "--configfile", "workflow/config/smoke.yaml", str(overlay),
                      "--", "results/hostile/runs/fashion_mnist/resnet8/bn/base/seed0/summary.json")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    commands = [line.split(":", 1)[1] for line in out.splitlines() if line.startswith("Shell command:")]
    (train,) = [c for c in commands if " msr train " in c]
    (prepare,) = [c for c in commands if c.strip().startswith("msr prepare")]
    assert _arg_after(train, "--data-root") == HOSTILE_ROOT and _arg_after(prepare, "--data-root") == HOSTILE_ROOT
    assert _arg_after(prepare, "--mirror") == HOSTILE_MIRROR
    assert _arg_after(train, "--override") == 'noise_dist="gaussian"'


def test_f3_a_string_override_that_is_no_valid_choice_is_named():
    cfg = merged({"train": {"overrides": {"norm": "bn; touch HACKED"}}})
    with pytest.raises(grid.GridError, match="config train.overrides=.*norm='bn; touch HACKED' is not one of"):
        grid.check_config(cfg)


@pytest.mark.parametrize("overlay, named", [
    ({"train": {"data_root": "data\n"}}, "data_root"),
    ({"train": {"data_root": "data\x00x"}}, "data_root"),
    ({"train": {"data_root": "-rf"}}, "data_root"),
    ({"train": {"data_root": "data/{dataset}"}}, "data_root"),
    ({"train": {"data_root": ""}}, "data_root"),
    ({"train": {"data_mirror": "/srv/mirror\r"}}, "data_mirror"),
    ({"train": {"overrides": {"norm": "bn\nnone"}}}, "overrides"),
    ({"name": "digits\n"}, "name"),
    ({"name": "my set"}, "name"),
])
def test_f3_what_cannot_be_a_path_or_a_name_is_rejected_by_the_schema(overlay, named):
    with pytest.raises(WorkflowError) as err:
        merged(overlay)
    assert named in str(err.value)


def test_f3_spaces_and_shell_characters_are_valid_paths():
    cfg = merged({"train": {"data_root": HOSTILE_ROOT, "data_mirror": HOSTILE_MIRROR}})
    assert cfg["train"]["data_root"] == HOSTILE_ROOT


@pytest.mark.slow
def test_f3_a_run_with_a_hostile_spaced_data_root_trains_in_that_folder(tmp_path):
    """The audit's `data; touch X #`, with a space: prepare and train run, in that folder."""
    work = _copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "hostile.yaml"
    overlay.write_text(yaml.safe_dump({"name": "hostile", "train": {"data_root": HOSTILE_ROOT}}))
    run = "results/hostile/runs/digits/resnet8/msr/base/seed0"
    done = _snakemake(work, "--cores", "2", "--configfile", "workflow/config/smoke.yaml", str(overlay),
                      "--", f"{run}/summary.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / HOSTILE_ROOT / "processed" / "digits-8.pt").is_file()
    assert json.loads((work / run / "config.json").read_text())["data_root"] == HOSTILE_ROOT
    assert not list(work.glob("HACKED*")) and not (work / "my").exists()


# ============================================================ 4. decompression bombs


def _gzip_bomb(path: Path, size: int) -> Path:
    """A .gz of ``size`` zero bytes (256 MB take ~0.25 MB on disk), written in chunks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as f:
        chunk = bytes(1 << 22)
        for _ in range(size // len(chunk)):
            f.write(chunk)
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_MIRROR", str(tmp_path / "no-default-mirror"))

    def no_network(*args, **kwargs):
        raise AssertionError("no download in this test")

    monkeypatch.setattr(fashion_mnist, "official_sources", no_network)
    monkeypatch.setattr(fetch, "fetch", no_network)


def test_f4_a_gzip_bomb_in_raw_is_stopped_at_the_official_size(tmp_path, offline):
    raw = tmp_path / "raw" / "fashion-mnist"
    names = fashion_mnist.FILES
    _gzip_bomb(raw / f"{names[0]}.gz", 256 << 20)  # the train images: 47 MB officially
    for name in names[1:]:
        (raw / f"{name}.gz").write_bytes(gzip.compress(b"x"))
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge) as err:
            data.load_dataset("fashion_mnist", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = fashion_mnist.CONTENT[names[0]][0]
    assert f"decompresses to more than {size} bytes" in str(err.value) and str(raw / names[0]) in str(err.value)
    assert peak < 3 * size  # read up to the official size, not the 256 MB it expands to
    assert not (tmp_path / "processed").exists()
    assert (raw / f"{names[0]}.gz").exists()  # the user's file: named, not deleted


def test_f4_a_bomb_in_the_mirror_is_never_copied(tmp_path, offline, monkeypatch):
    small = {name: bytes([i]) * 100 for i, name in enumerate(fashion_mnist.FILES)}
    monkeypatch.setattr(fashion_mnist, "CONTENT", {n: (len(c), hashlib.md5(c).hexdigest()) for n, c in small.items()})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, content in small.items():
        (mirror / f"{name}.gz").write_bytes(gzip.compress(content))
    victim = fashion_mnist.FILES[1]
    # compact: 16 MB of zeros in ~16 KB, far more than the 100 bytes it should hold
    _gzip_bomb(mirror / f"{victim}.gz", 16 << 20)
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=r"got more than 100 bytes \(reading stopped there"):
        data.prepare("fashion_mnist", root, mirror=mirror)
    # larger than any gzip of 100 bytes can be: refused before a byte is copied
    (mirror / f"{victim}.gz").write_bytes(os.urandom(200_000))
    with pytest.raises(TooLarge, match="more than any gzip of the official .* can be; nothing was copied"):
        data.prepare("fashion_mnist", root, mirror=mirror)
    assert [p for p in root.rglob("*") if not p.is_dir()] == []  # nothing copied, no .part left


def test_f4_a_download_that_grows_past_its_limit_is_cut_and_deleted(tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(5000))
    dest = tmp_path / "dest.part"
    with pytest.raises(fetch.DownloadFailed, match="more than 1000 bytes") as err:
        fetch.fetch(source.as_uri(), dest, max_bytes=1000, tries=3, backoff=0)
    assert "1 of 3 tries" in str(err.value)  # not worth another try
    assert not dest.exists()
    fetch.fetch(source.as_uri(), dest, max_bytes=5000)  # exactly the limit is fine
    assert dest.read_bytes() == source.read_bytes()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    return info, content if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("bad, named", [
    (_member("top/link", tarfile.SYMTYPE, link="/etc/passwd"), "link"),
    (_member("top/inner", tarfile.SYMTYPE, link="file"), "is a link"),
    (_member("top/hard", tarfile.LNKTYPE, link="top/file"), "is a link"),
    (_member("../escape", content=b"x"), "outside"),
    (_member("top/dev", tarfile.CHRTYPE), "special file"),
    (_member("top/fifo", tarfile.FIFOTYPE), "special file"),
    (_member("top/huge", content=bytes(5000)), "more than 4096 bytes"),
])
def test_f4_a_hostile_archive_extracts_nothing(tmp_path, bad, named):
    raw = tmp_path / "raw"
    raw.mkdir()
    archive = _tar(tmp_path / "a.tar.gz", [_member("top/file", content=b"fine"), bad])
    with pytest.raises(DatasetError) as err:
        fetch.extract_tar(archive, raw, "top", max_bytes=4096)
    assert named in str(err.value)
    assert list(raw.iterdir()) == []  # no folder, no temp folder
    assert not (tmp_path / "escape").exists()


def test_f4_an_absolute_member_lands_inside_or_nowhere(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    target = tmp_path / "abs-target"
    archive = _tar(tmp_path / "a.tar.gz", [_member("top/file", content=b"fine"), _member(str(target), content=b"x")])
    fetch.extract_tar(archive, raw, "top", max_bytes=4096)  # the data filter strips the leading '/'
    assert not target.exists() and sorted(p.name for p in raw.iterdir()) == ["top"]


def test_f4_cifar_caps_follow_the_catalog():
    from msr.data import cifar

    for name, official in (("cifar10", 170_498_071), ("cifar100", 169_001_437)):
        src = cifar.source(name)
        assert src.archive_bytes == official
        assert 186_000_000 < src.extracted_bytes < 300_000_000  # real folders: ~186 MB


# ============================================================ 5. the fork server


def test_f5_the_server_refuses_another_users_client(monkeypatch, capsys):
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server_end, client_end:
        real = os.getuid()
        assert prefork.admit(server_end)  # same user: welcome
        monkeypatch.setattr(prefork.os, "getuid", lambda: real + 1)  # as if the server were another user's
        assert not prefork.admit(server_end)
        answer = client_end.recv(1000)
    assert answer.startswith(prefork._REFUSE) and f"not uid {real}".encode() in answer
    assert f"refused a client (pid {os.getpid()}, uid {real})" in capsys.readouterr().err


def test_f5_a_client_refuses_another_users_server(tmp_path, monkeypatch, capsys):
    path = tmp_path / "server.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # the kernel completes the connection; nobody needs to accept it
    with listener:
        monkeypatch.setenv("MSR_PREFORK_SOCKET", str(path))
        for var in (*prefork.SCHEDULER_JOB_VARS, prefork.ENV_ALLOCATION):
            monkeypatch.delenv(var, raising=False)
        real = os.getuid()
        monkeypatch.setattr(prefork.os, "getuid", lambda: real + 1)
        assert prefork.delegate(["train"]) is None  # runs in its own process instead
    err = capsys.readouterr().err
    assert f"runs as uid {real}, not as you" in err and "running in this process" in err


def test_f5_a_handler_runs_nothing_for_a_client_that_gave_up():
    # a client that timed out waiting for the greeting has sent nothing and runs the job itself
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client_end.close()
    ran: list = []
    with server_end:
        prefork._handle(server_end, job=ran.append)
    assert ran == []


@pytest.fixture
def prefork_server(tmp_path):
    path = tmp_path / "server.sock"
    proc = subprocess.Popen([*MSR, "prefork", "--serve", str(path)])
    wait_until(lambda: path.exists() or proc.poll() is not None, 180, "the server's socket")
    assert proc.poll() is None, "the server exited at start"
    yield proc, path
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=30)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_f5_a_stopped_server_does_not_hold_its_client(tmp_path, prefork_server):
    proc, path = prefork_server
    env = {k: v for k, v in os.environ.items() if k not in prefork.SCHEDULER_JOB_VARS}
    env.update(MSR_PREFORK_SOCKET=str(path), MSR_PREFORK_TIMEOUT_S="2")
    command = [*MSR, "train", "--variant", "no_such_variant", "--out", str(tmp_path / "x")]
    os.kill(proc.pid, signal.SIGSTOP)  # the audit: a stopped server left the client waiting forever
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # it said why and ran the command itself: the variant error comes from its own process
    assert "did not answer within 2 s" in done.stderr and "running in this process" in done.stderr
    assert done.returncode == 2 and "valid variants" in done.stderr
    # woken up, the server finds the abandoned connection empty (nothing to run: unit test above)
    # and serves the next client as before
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "valid variants" in done.stderr
    assert "running in this process" not in done.stderr


@pytest.mark.slow
def test_f5_a_stopped_handler_does_not_hold_its_client_after_the_job(tmp_path, prefork_server):
    proc, path = prefork_server
    env = {k: v for k, v in os.environ.items() if k not in prefork.SCHEDULER_JOB_VARS}
    env.update(MSR_PREFORK_SOCKET=str(path), MSR_PREFORK_TIMEOUT_S="3")
    out = tmp_path / "run"
    client = subprocess.Popen([*MSR, "train", "--dataset", "digits", "--arch", "resnet8", "--image-size", "8",
                               "--threads", "1", "--epochs", "3", "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (out / "config.json").exists(), 120, "the job to start")
    (handler,) = _children(proc.pid)
    os.kill(handler, signal.SIGSTOP)  # the job runs on; nobody will relay its exit status
    try:
        _, err = client.communicate(timeout=300)
    finally:
        os.kill(handler, signal.SIGCONT)
    assert (out / "summary.json").exists()  # the job itself finished
    assert client.returncode == 1
    assert "ended but its server did not report how within 3 s" in err


def test_f5_a_job_in_a_slurm_allocation_never_uses_a_server_outside_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSR_PREFORK_SOCKET", str(tmp_path / "nobody.sock"))
    for var in prefork.SCHEDULER_JOB_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv(prefork.ENV_ALLOCATION, raising=False)
    assert prefork.delegate(["train"]) is None
    err = capsys.readouterr().err
    assert "runs in the scheduler allocation SLURM_JOB_ID=42 and the server outside it" in err
    assert "no prefork server" not in err  # refused before connecting
    monkeypatch.setenv(prefork.ENV_ALLOCATION, "")  # a server on the submitting host
    assert prefork.delegate(["train"]) is None and "allocation SLURM_JOB_ID=42" in capsys.readouterr().err
    # `make run` inside one allocation (the server runs there too): the server is used
    monkeypatch.setenv(prefork.ENV_ALLOCATION, "SLURM_JOB_ID=42")
    assert prefork.delegate(["train"]) is None
    assert "no prefork server at" in capsys.readouterr().err  # it tried to connect


def test_f5_msr_prefork_tells_its_jobs_where_the_server_runs(tmp_path):
    script = f"import os; print(os.environ[{prefork.ENV_ALLOCATION!r}])"
    env = {k: v for k, v in os.environ.items() if k not in prefork.SCHEDULER_JOB_VARS}
    env["SLURM_JOB_ID"] = "77"
    done = subprocess.run([*MSR, "prefork", "--socket-dir", str(tmp_path), "--", sys.executable, "-c", script],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SLURM_JOB_ID=77"


# ============================================================ 6. numbers, depths, set names


@pytest.mark.parametrize("overlay, key", [
    ({"train": {"lr": math.nan}}, "config train.lr=nan"),
    ({"train": {"lr": math.inf}}, "config train.lr=inf"),
    ({"train": {"noise_delta": math.nan}}, "config train.noise_delta=nan"),
    ({"sweeps": {"lr": {"values": [0.1, math.nan]}}}, "config sweeps.lr.values[1]=nan"),
    ({"sweeps": {"noise_delta": {"values": [-math.inf]}}}, "config sweeps.noise_delta.values[0]=-inf"),
    ({"train": {"overrides": {"lam": math.nan}}}, "config train.overrides.lam=nan"),
])
def test_f6_nan_and_inf_are_named_before_the_schema(overlay, key):
    cfg = merged(overlay, check=False)
    with pytest.raises(grid.GridError, match="not a finite number") as err:
        grid.check_types(cfg)
    assert str(err.value).startswith(key)


def test_f6_yaml_nan_is_named_by_the_pipeline_before_any_job(tmp_path):
    work = _copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "nan.yaml"
    overlay.write_text("name: nan\ntrain:\n  lr: .nan\n")  # YAML's NaN: a float the schema lets through
    done = _snakemake(work, "-n", "--configfile", str(overlay))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "config train.lr=nan: not a finite number" in out and "Job stats" not in out


@pytest.mark.parametrize("field", ["lr", "weight_decay", "unity_kappa"])
def test_f6_infinite_variant_fields_are_rejected(field):
    with pytest.raises(ValueError, match=f"{field}=inf must be a finite number"):
        get_spec("msr", **{field: math.inf})


def test_f6_depth_is_bounded_by_the_deepest_cifar_resnet():
    assert MAX_DEPTH == 1202 and parse_arch("resnet1202") == 1202
    for arch in ("resnet600000002", "resnet1208"):
        with pytest.raises(ValueError, match="at most 1202"):
            parse_arch(arch)
    done = subprocess.run([*MSR, "train", "--arch", "resnet600000002", "--out", "/nonexistent/never"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "at most 1202" in done.stderr


def test_f6_a_config_that_changes_the_default_study_needs_its_own_name():
    default = merged()
    grid.check_set_name(default, default, "default.yaml")  # the default study itself
    # where the data live and what a job may use change no result
    grid.check_set_name(merged({"resources": {"threads": 2}, "train": {"data_root": "/big disk/data"}}),
                        default, "default.yaml")
    grid.check_set_name(merged({"name": "mine", "train": {"lr": 0.05}}), default, "default.yaml")
    for overlay, key in (({"train": {"lr": 0.05}}, "train.lr"), ({"seeds": [0]}, "seeds"),
                         ({"sweeps": {"lr": {"values": [0.1]}}}, "sweeps.lr.values")):
        with pytest.raises(grid.GridError, match=f"config name='digits' is the set of default.yaml, but this "
                                                 f"config changes {key}: .* `name: my-study`"):
            grid.check_set_name(merged(overlay), default, "default.yaml")


def test_f6_the_schema_gives_no_default_name():
    cfg = copy.deepcopy(DEFAULT)
    del cfg["name"]
    with pytest.raises(WorkflowError, match="'name' is a required property"):
        validate(cfg, SCHEMA)


def test_f6_the_pipeline_refuses_a_nameless_config_file_before_any_job(tmp_path):
    work = _copy_workflow(tmp_path / "wf")
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("seeds: [0]\n")  # no name: it would inherit default.yaml's `digits`
    done = _snakemake(work, "-n", "--configfile", str(overlay))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Job stats" not in out
    assert "config name='digits' is the set of workflow/config/default.yaml, but this config changes seeds" in out
    assert not (work / "results").exists() and not (work / "figures").exists()
