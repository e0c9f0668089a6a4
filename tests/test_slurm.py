"""The SLURM path against a real one-node Slurm cluster on this machine (`make test-slurm`; CI
runs it after `make test`). tests/test_slurm_profile.py checks the settings without a cluster.

tools/slurm_local.sh installs Slurm with apt and starts the cluster (root); the smoke set
(workflow/config/smoke.yaml) runs through the SLURM executor with workflow/profiles/slurm in a
temporary copy of the workflow, and the tests check that every train job ran as a Slurm job on
that node, that no job handed its work to a fork server (msr prefork) on the submitting host,
that `msr verify` accepts the figures, and that a failing job is reported FAILED with a non-zero
exit. The cluster is stopped afterwards, also when a test fails or pytest gets SIGTERM.
MSR_TEST_SLURM=1 runs these tests where possible and skips them (saying why) where not (not root,
no apt); MSR_TEST_SLURM=required (CI) turns such a skip into a failure. Without MSR_TEST_SLURM
(plain `make test`) they skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm_local.sh"
PROFILE = ["--workflow-profile", "workflow/profiles/slurm"]
SMOKE = ["--configfile", "workflow/config/smoke.yaml"]
# the smoke set's four runs (workflow/config/smoke.yaml: bn and msr, plus one lr and one batch-size point)
# the smoke set's runs: msr's two validation runs (lr selection), the main grid, the batch-size
# point, and the lr point x2 unless x2 is the factor chosen for msr (then it is msr's main run)
SMOKE_RUNS = ["digits/resnet8/msr/val-lrx0.5/seed0", "digits/resnet8/msr/val-lrx2/seed0",
              "digits/resnet8/bn/base/seed0", "digits/resnet8/msr/base/seed0", "digits/resnet8/msr/bs32/seed0"]
LR_POINT = "digits/resnet8/msr/lrx2/seed0"
LOCAL_RULES = ("check_runs", "all", "select_lr")  # localrule: True in the workflow


def smoke_runs(wd: Path) -> list[str]:
    """SMOKE_RUNS plus the lr point unless the lr selection chose its factor for msr."""
    record = json.loads((wd / "results/smoke/lr_selection.json").read_text())
    [msr] = [s for s in record["selected"] if s["variant"] == "msr"]
    return SMOKE_RUNS + ([LR_POINT] if msr["lr_factor"] != 2 else [])
SLURM_SETTINGS = ["MSR_SLURM_PARTITION", "MSR_SLURM_GPU_PARTITION", "MSR_SLURM_ACCOUNT", "MSR_SLURM_GPU_GRES"]


def copy_workflow(dest: Path) -> Path:
    """The workflow files in a folder of their own, so no result lands in the repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "Makefile"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("workflow", "notebooks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dest


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any MSR_SLURM_* setting or fork server, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k not in SLURM_SETTINGS and k != "MSR_PREFORK_SOCKET"}
    env.update(settings)
    return env


# ------------------------------------------------------------------- with a cluster (minutes)
MODE = os.environ.get("MSR_TEST_SLURM", "")


def why_no_cluster() -> str | None:
    if MODE not in ("1", "required"):
        return "needs a real Slurm cluster on this machine: run `make test-slurm` (MSR_TEST_SLURM=1)"
    if os.geteuid() != 0:
        return "needs root: tools/slurm_local.sh installs Slurm with apt and starts its daemons as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def sh(*args: str, timeout: int = 60) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def wait_gone(jobs: list[str], timeout: float = 120) -> None:
    """Until squeue no longer lists the jobs (finished, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while sh("squeue", "-h", "-j", ",".join(jobs), "-o", "%i").strip():
        assert time.monotonic() < deadline, f"jobs {jobs} still queued after {timeout:.0f} s"
        time.sleep(0.5)


def key_values(text: str) -> dict[str, str]:
    """`scontrol show -o` output: KEY=VALUE pairs."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


@dataclass
class Cluster:
    node: str
    partition: str
    ctld_log: Path

    def log(self) -> str:
        return self.ctld_log.read_text()

    def started_on_node(self, job: str, log: str) -> bool:
        """slurmctld starts a job from one of two schedulers, and each logs it its own way: the main
        one as `sched: Allocate JobId=5 NodeList=vm`, the backfill one (every 30 s, for jobs the
        main pass left pending) as `sched/backfill: _start_job: Started JobId=5 in debug on vm`."""
        return bool(re.search(rf"sched: Allocate JobId={job} NodeList={self.node} ", log)
                    or re.search(rf"sched/backfill: _start_job: Started JobId={job} in {self.partition} on "
                                 rf"{self.node}$", log, flags=re.M))


class _Stop(Exception):
    pass


def _stop_on_sigterm(signum, frame):
    raise _Stop("SIGTERM")  # unwinds through the fixture's finally: the cluster still goes down


@pytest.fixture(scope="module")
def cluster():
    reason = why_no_cluster()
    if reason:
        if MODE == "required":
            pytest.fail(f"MSR_TEST_SLURM=required, but the Slurm tests cannot run: {reason}")
        pytest.skip(reason)
    was_up = subprocess.run([str(SCRIPT), "status"], capture_output=True, timeout=30).returncode == 0
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        start = time.monotonic()
        up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, f"tools/slurm_local.sh up failed:\n{up.stderr}"
        print(f"\n[slurm] cluster up in {time.monotonic() - start:.1f} s:\n{up.stderr.strip()}")
        node = key_values(sh("scontrol", "show", "node", "-o"))
        partition = key_values(sh("scontrol", "show", "partition", "-o"))
        config = sh("scontrol", "show", "config")
        log = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, flags=re.M).group(1)
        yield Cluster(node=node["NodeName"], partition=partition["PartitionName"], ctld_log=Path(log))
    finally:
        try:
            if not was_up:
                down = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=300)
                print(f"\n[slurm] {down.stderr.strip()}")
                assert down.returncode == 0, down.stderr
                status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=30)
                assert status.returncode == 3, f"still up after down: {status.stdout}"
                again = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=60)
                assert again.returncode == 0 and "not up" in again.stderr, again.stderr
                assert not Path("/etc/slurm/slurm.conf").exists()
        finally:
            signal.signal(signal.SIGTERM, previous)


def test_cluster_is_this_machine_as_one_node(cluster):
    conf = Path("/etc/slurm/slurm.conf").read_text()
    for line in ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MinJobAge=300",
                 "AccountingStorageType=accounting_storage/none"]:
        assert re.search(rf"^{re.escape(line)}$", conf, flags=re.M), line
    node = key_values(sh("scontrol", "show", "node", "-o"))
    assert node["NodeName"] == socket.gethostname().split(".")[0] and node["State"] == "IDLE"
    assert int(node["CPUTot"]) == os.cpu_count()
    mem_total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert mem_total_mb // 2 < int(node["RealMemory"]) <= mem_total_mb
    partition = key_values(sh("scontrol", "show", "partition", "-o"))
    def_mem = int(partition["DefMemPerCPU"])
    assert def_mem * int(node["CPUTot"]) <= int(node["RealMemory"])

    # a job that asks for no memory gets its CPU's share, not the whole node
    job = sh("sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 30").strip()
    try:
        info = key_values(sh("scontrol", "show", "job", "-o", job))
        assert int(info["MinMemoryCPU"].rstrip("M")) == def_mem
        if int(node["CPUTot"]) > 1:
            assert def_mem < int(node["RealMemory"])
    finally:
        sh("scancel", job)
        wait_gone([job])  # its CPU must be free for the next test's two jobs

    again = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stderr, again.stderr


def test_gpu_slot_claims_of_two_slurm_jobs_do_not_wait_for_each_other(cluster, tmp_path):
    """Two Slurm jobs on one node claim a slot of "GPU 0" at the same time (the id Slurm gives each
    job's GPU under device confinement), one slot per GPU: with a node-wide lock folder the second
    would time out after 3 s; with a folder per allocation both hold their slot together."""
    code = ("import sys, time; from msr.infra.gpu import claim_gpu_slot; "
            "slot = claim_gpu_slot(1, ids=['0'], set_env=False, timeout_s=3); "
            "print(time.time(), slot.path, flush=True); time.sleep(6); print(time.time(), flush=True)")
    jobs = [sh("sbatch", "--parsable", "--mem=500", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
               f"--chdir={tmp_path}", "--wrap", f"{sys.executable} -c \"{code}\"").strip() for _ in range(2)]
    wait_gone(jobs)
    log = cluster.log()
    spans = []
    for job in jobs:
        assert re.search(rf"_job_complete: JobId={job} WEXITSTATUS 0$", log, flags=re.M), (tmp_path / f"{job}.out").read_text()
        started, path, ended = (tmp_path / f"{job}.out").read_text().split()
        assert Path(path).parent.name.endswith(f"-slurm{job}")
        spans.append((float(started), float(ended)))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, "the two jobs did not run at the same time, so this proves nothing"


class PreforkTrap:
    """A Unix socket where `msr train` would find a fork server if MSR_PREFORK_SOCKET reached a job:
    every connection is counted (and dropped, so a leaked job fails instead of hanging)."""

    def __init__(self, path: Path):
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


@dataclass
class Smoke:
    wd: Path
    done: subprocess.CompletedProcess
    seconds: float
    prefork_connections: int


def through_slurm(wd: Path, *args: str, env: dict[str, str], limit: int) -> subprocess.CompletedProcess:
    """snakemake with the slurm profile against the local cluster. No accounting database here, so
    job states come from squeue (sacct would loop forever); `timeout -k` because a plugin stuck in
    that loop ignores SIGTERM."""
    cmd = ["timeout", "-k", "30", str(limit), sys.executable, "-m", "snakemake", *PROFILE, *SMOKE,
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-keep-successful-logs", "--retries", "0", "--jobs", "4", *args]
    # its own process group: if this test is stopped (SIGTERM, Ctrl-C), snakemake and everything
    # it started go too - killing only `timeout` would leave snakemake polling a stopped cluster
    proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit + 60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def smoke(cluster, tmp_path_factory) -> Smoke:
    """The smoke set through Slurm, once, started the way `make run` would start it under the fork
    server: MSR_PREFORK_SOCKET names a live socket."""
    wd = copy_workflow(tmp_path_factory.mktemp("slurm") / "wf")
    trap = PreforkTrap(wd / "prefork.sock")
    env = clean_env(MSR_SLURM_PARTITION=cluster.partition, MSR_PREFORK_SOCKET=str(wd / "prefork.sock"))
    start = time.monotonic()
    try:
        done = through_slurm(wd, env=env, limit=1200)  # ~5 min on an idle 2-core machine
    finally:
        trap.close()
    seconds = time.monotonic() - start
    print(f"\n[slurm] the smoke set through Slurm: {seconds:.0f} s, exit {done.returncode}")
    return Smoke(wd, done, seconds, trap.connections)


def test_smoke_set_runs_every_job_as_a_slurm_job(smoke, cluster):
    out = smoke.done.stdout + smoke.done.stderr
    assert smoke.done.returncode == 0, out[-5000:]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", out, flags=re.M)
    # every job but the local rules (LOCAL_RULES) went to Slurm. The first job stats are the DAG
    # before the lr selection's checkpoint: the lr point that the choice may make msr's main run
    # is added after it (or never)
    runs = smoke_runs(smoke.wd)
    stats = out[out.index("Job stats:"):]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats[:stats.index("\ntotal")], flags=re.M))
    assert int(counts["train"]) == len(SMOKE_RUNS)
    assert len(submitted) == sum(int(n) for rule, n in counts.items() if rule not in LOCAL_RULES) \
        + len(runs) - len(SMOKE_RUNS)

    # each train job: a Slurm job on the cluster's node that ended with exit 0, whose own output
    # file (written by slurmstepd) shows Snakemake running and finishing that run inside it
    log = cluster.log()
    trained = {}
    for job, logfile in submitted:
        assert cluster.started_on_node(job, log), job
        assert re.search(rf"_job_complete: JobId={job} WEXITSTATUS 0$", log, flags=re.M), job
        if "/rule_train/" in logfile:
            text = Path(logfile).read_text()
            [output] = set(re.findall(r"output: results/smoke/runs/(\S+)/summary.json", text))
            assert "localrule train:" in text and "Finished jobid: 0 (Rule: train)" in text, text[-3000:]
            trained[output] = job
    assert sorted(trained) == sorted(runs)
    assert len(set(trained.values())) == len(runs)  # one Slurm job per run
    for run in runs:
        assert (smoke.wd / "results/smoke/runs" / run / "summary.json").exists()


def test_no_job_handed_its_work_to_the_fork_server(smoke):
    assert smoke.done.returncode == 0
    assert "msr: prefork off: jobs run through the slurm executor" in smoke.done.stderr
    assert smoke.prefork_connections == 0
    for log in (smoke.wd / "results/smoke/logs/train").rglob("*.log"):
        assert "prefork" not in log.read_text(), log


def test_msr_verify_accepts_the_figures(smoke):
    assert smoke.done.returncode == 0
    verify = subprocess.run([sys.executable, "-m", "msr", "verify", "figures/smoke"], cwd=smoke.wd,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "figures/smoke: OK" in verify.stdout, verify.stdout + verify.stderr


def test_a_failing_job_is_reported_failed(smoke, cluster):
    """Runs after the tests above (it damages one run of the smoke set): a run whose checkpoint is
    truncated is refused by `msr train`; Slurm records the job as failed, the plugin reports it
    FAILED and Snakemake exits non-zero."""
    run = smoke.wd / "results/smoke/runs/digits/resnet8/bn/base/seed0"
    (run / "summary.json").unlink()
    with open(run / "checkpoint.pt", "r+b") as f:
        f.truncate(100)
    env = clean_env(MSR_SLURM_PARTITION=cluster.partition)
    done = through_slurm(smoke.wd, f"{run.relative_to(smoke.wd)}/summary.json", env=env, limit=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    failed = re.search(r"SLURM-job '(\d+)' failed, SLURM status is: 'FAILED'", out)
    assert failed, out[-3000:]
    assert re.search(rf"_job_complete: JobId={failed.group(1)} WEXITSTATUS [1-9]", cluster.log())
    train_log = (smoke.wd / "results/smoke/logs/train/digits/resnet8/bn/base/seed0.log").read_text()
    assert "checkpoint.pt: cannot be loaded" in train_log
