"""Provenance in the manifest and `msr reproduce` (issue 17): a tiny published set of three
ResNet-8 digits runs at 8x8 (1 epoch each), reproduced here (bitwise) and against tampered
manifests (a mismatch, a result outside the spread, another machine, another config)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from scipy import stats

from msr import machine
from msr.analysis import figures, manifest, reproduce
from msr.cli import main as msr_main
from msr.training.config import RunConfig
from msr.training.loop import train

GROUP = "digits/resnet8/bn/base"
RIDS = [f"{GROUP}/seed{k}" for k in range(3)]


def quiet(*_args, **_kw):
    pass


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A project with a set `tiny` made the way the pipeline makes one: runs, a provenance
    record, a manifest (the runs' data_root is relative, as in the pipeline's configs)."""
    root = tmp_path_factory.mktemp("proj")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for k, rid in enumerate(RIDS):
            cfg = RunConfig.from_dict(dict(dataset="digits", arch="resnet8", variant="bn", epochs=1, seed=k,
                                           batch_size=64, image_size=8, data_root="data", threads=1,
                                           probe_every=50, device="cpu"))
            train(cfg, root / "results/tiny/runs" / rid, log=quiet)
    (root / "figures/tiny").mkdir(parents=True)
    (root / "figures/tiny/tab.csv").write_text("a\n1\n")
    prov = root / "results/tiny/provenance/tab.json"
    figures.write_provenance(prov, "tab", RIDS, ["figures/tiny/tab.csv"])
    record = manifest.build_manifest([prov], run_dirs={rid: f"results/tiny/runs/{rid}" for rid in RIDS}, cwd=root,
                                     out=root / "figures/tiny/MANIFEST.json", config={"name": "tiny"})
    manifest.write_manifest(record, root / "figures/tiny/MANIFEST.json")
    return root


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One scratch folder for the module: a run reproduced once is reused (it is complete)."""
    return tmp_path_factory.mktemp("scratch") / "out"


def load(root: Path) -> dict:
    return json.loads((root / "figures/tiny/MANIFEST.json").read_text())


def tampered(root: Path, tmp: Path, change) -> Path:
    """A copy of the set (same project root) with an edited manifest."""
    where = root / "figures" / f"tiny-{tmp.name}"
    shutil.copytree(root / "figures/tiny", where)
    m = load(root)
    m["set_dir"] = f"figures/{where.name}"
    change(m)
    (where / "MANIFEST.json").write_text(json.dumps(m))
    return where


def run_cli(capsys, *args) -> tuple[int, str]:
    code = msr_main(["reproduce", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---- provenance


def test_manifest_records_the_machine_and_what_each_run_gave(published):
    m = load(published)
    assert m["manifest_version"] == 3
    here = machine.machine_record("cpu")
    (entry,) = m["machines"]
    assert entry["n_runs"] == 3 and entry["device"] == "cpu" and entry["precision"] == "fp32" and entry["threads"] == 1
    made = entry["machine"]
    for key in ("cpu_model", "cpu_flags", "torch", "onednn", "mkl", "cpu_capability", "cuda", "cudnn", "gpu"):
        assert key in made, key
    assert made["cpu_model"] == here["cpu_model"] and made["cpu_flags"] == here["cpu_flags"]
    assert made["torch"] == here["torch"] and made["onednn"] == here["onednn"]
    assert m["runs_made_on"].startswith(f"all 3 run(s) on {machine.describe(made)} [cpu, fp32, 1 thread]")
    assert "bitwise only on the same CPU model" in m["reproducibility"]
    assert set(m["manifest_made_on"]["packages"]) == set(manifest.PLOT_PACKAGES)
    assert m["manifest_made_on"]["cpu_model"] == here["cpu_model"] and "torch" not in m["manifest_made_on"]
    for rid in RIDS:
        run = published / "results/tiny/runs" / rid
        summary = json.loads((run / "summary.json").read_text())
        rec = m["runs"][rid]
        assert rec["machine"] == 0 and rec["status"] == "completed"
        assert rec["final_test_acc"] == summary["final_test_acc"]
        assert rec["results_sha256"] == manifest.results_digest(run / "metrics.csv")
        assert rec["config"]["seed"] == int(rid[-1]) and "machine" not in rec["config"]
        # the run's own config.json carries the same machine record
        assert json.loads((run / "config.json").read_text())["machine"] == made


def test_results_digest_ignores_only_the_timing_columns(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("epoch,test_acc,seconds,images_per_s\n1,0.5,1.25,100.0\n")
    b.write_text("epoch,test_acc,seconds,images_per_s\n1,0.5,9.75,13.0\n")
    c.write_text("epoch,test_acc,seconds,images_per_s\n1,0.5000000000000001,1.25,100.0\n")
    assert manifest.results_digest(a) == manifest.results_digest(b) != manifest.results_digest(c)
    assert manifest.results_digest(tmp_path / "none.csv") is None


def test_machine_record_reads_the_cpu_model_and_kernel_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512_fp16 amx_tile amx_bf16 avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: something else\n")
    monkeypatch.setattr(machine, "CPUINFO", info)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    rec = machine.machine_record("cpu", with_torch=False)
    assert rec["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert rec["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"]
    assert rec["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and "torch" not in rec
    assert machine.bitwise_key(rec)["cpu_model"] == rec["cpu_model"]
    assert machine.bitwise_key({"cpu_model": None, "device_name": "x86_64"}) is None


# ---- the rule


def test_the_allowed_range_is_a_bonferroni_prediction_interval():
    accs = [0.97, 0.98, 0.99]
    lo, hi = reproduce.Spread(accs, 0).allowed(k=3)
    half = stats.t.ppf(1 - 0.05 / 6, 2) * 0.01 * math.sqrt(1 + 1 / 3)
    assert lo == pytest.approx(0.98 - half) and hi == 1.0  # clipped at 100%
    half = stats.t.ppf(0.975, 1) * math.sqrt(0.00005) * math.sqrt(1.5)  # std of (0.50, 0.51)
    assert reproduce.Spread([0.50, 0.51], 1).allowed(k=1) == pytest.approx((0.505 - half, 0.505 + half))
    assert reproduce.Spread([0.9], 2).allowed(k=1) is None


def _rec(acc=0.9, status="completed", digest="d1", **config):
    return {"config": {"lr": 0.1, "threads": 1, "device": "cpu", **config}, "variant_spec_sha256": "s",
            "status": status, "final_test_acc": acc if status == "completed" else math.nan,
            "diverged_at_step": 40 if status == "diverged" else None, "results_sha256": digest}


HERE = {"machine": {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2"], "torch": "2.14.1"}, "device": "cpu",
        "precision": "fp32", "threads": 1}
XEON = {**HERE, "machine": {**HERE["machine"], "cpu_model": "Intel Xeon", "cpu_flags": ["avx2", "avx512_fp16"]}}


@pytest.mark.parametrize("published, where, reproduced, spread, kind, passed", [
    (_rec(), HERE, _rec(), [0.8, 0.9, 1.0], "bitwise", True),
    (_rec(), XEON, _rec(), [0.8, 0.9, 1.0], "bitwise", True),  # bitwise anywhere is bitwise
    (_rec(), HERE, _rec(digest="d2"), [0.8, 0.9, 1.0], "MISMATCH", False),  # same machine: bits expected
    (_rec(), XEON, _rec(0.85, digest="d2"), [0.8, 0.9, 1.0], "within spread", True),
    (_rec(), XEON, _rec(0.30, digest="d2"), [0.8, 0.9, 1.0], "OUTSIDE", False),
    (_rec(), {**HERE, "machine": None}, _rec(0.85, digest="d2"), [0.8, 0.9, 1.0], "within spread", True),
    (_rec(), XEON, _rec(status="diverged", digest="d2"), [0.8, 0.9, 1.0], "OUTSIDE", False),
    (_rec(), XEON, _rec(0.9, digest="d2"), [0.9], "no spread", False),
    (_rec(), HERE, _rec(lr=0.2), [0.8, 0.9, 1.0], "config differs", False),
    (_rec(), HERE, _rec(new_option=None), [0.8, 0.9, 1.0], "bitwise", True),  # an option added since
])
def test_judge(published, where, reproduced, spread, kind, passed):
    v = reproduce.judge(published, where, reproduced, HERE, reproduce.Spread(spread, 0), k=1)
    assert (v.kind, v.passed) == (kind, passed), v.detail


def test_judge_divergence_against_the_published_seeds():
    diverged = _rec(status="diverged", digest="d2")
    assert reproduce.judge(_rec(status="diverged"), XEON, diverged, HERE, reproduce.Spread([0.9], 2), 1).kind == "within spread"
    v = reproduce.judge(_rec(status="diverged"), XEON, _rec(0.5, digest="d2"), HERE, reproduce.Spread([], 3), 1)
    assert (v.kind, v.passed) == ("OUTSIDE", False)  # every published seed diverged
    # another thread count, asked for: no bits expected, judged by the spread
    v = reproduce.judge(_rec(), HERE, _rec(0.9, digest="d2", threads=4), {**HERE, "threads": 4},
                        reproduce.Spread([0.8, 0.9, 1.0], 0), 1)
    assert v.kind == "within spread" and "threads" in v.detail


def test_the_sample_is_seeded_and_prefers_the_main_grid():
    runs = {f"d/a/{v}/{tag}/seed{s}": _rec(0.5 + s / 10) for v in ("bn", "msr") for tag in ("base", "lr0.4") for s in range(3)}
    runs["d/a/gc/base/seed0"] = _rec()  # a main-grid run without a spread: after the others
    runs["d/a/gc/base/seed1"] = _rec(status="diverged")
    pset = reproduce.PublishedSet(Path("M.json"), Path("."), {}, runs, [])
    first = reproduce.sample(pset, 6, seed=0)
    assert first == reproduce.sample(pset, 6, seed=0) != reproduce.sample(pset, 6, seed=1)
    assert sorted(first) == sorted(r for r in runs if "/base/" in r and "/gc/" not in r)
    assert sorted(reproduce.sample(pset, 8)[6:]) == ["d/a/gc/base/seed0", "d/a/gc/base/seed1"]  # then gc's
    assert reproduce.sample(pset, 20)[8:] and all("/lr0.4/" in r for r in reproduce.sample(pset, 20)[8:])


# ---- msr reproduce, end to end


def test_reproduce_here_is_bitwise_and_leaves_the_set_alone(published, scratch, capsys):
    before = {p: manifest.sha256_file(p) for p in (published / "results/tiny").rglob("*") if p.is_file()}
    code, out = run_cli(capsys, published / "figures/tiny", "--runs", 2, "--out", scratch, "--progress", "lines")
    assert code == 0, out
    assert "[1/2]" in out and "[2/2]" in out and "epoch   1/1" in out  # progress lines
    rows = [line.split() for line in out.splitlines() if line.startswith(GROUP)]
    assert len(rows) == 2 and all(row[-2:] == ["bitwise", "pass"] and row[1] == row[2] for row in rows), out
    assert "REPRODUCED: 2/2 runs pass (2 bitwise)" in out
    report = json.loads((scratch / reproduce.REPORT).read_text())
    assert report["passed"] is True and [r["match"] for r in report["runs"]] == ["bitwise", "bitwise"]
    assert before == {p: manifest.sha256_file(p) for p in (published / "results/tiny").rglob("*") if p.is_file()}
    # the scratch folder is never the set's results or its folder
    for owned in (published / "results/tiny/runs", published / "figures/tiny/x", published):
        code, out = run_cli(capsys, published / "figures/tiny", "--out", owned)
        assert code == 2 and "which the set owns" in out


def _chosen(published, scratch) -> str:
    return reproduce.sample(reproduce.load_set(published / "figures/tiny"), 1)[0]


def test_a_tampered_run_is_a_mismatch_here_and_outside_elsewhere(published, scratch, capsys, tmp_path):
    rid = _chosen(published, scratch)

    def far_results(m):  # the published seeds all far from what this code trains
        for k, r in enumerate(RIDS):
            m["runs"][r].update(final_test_acc=0.99 - k / 1000, results_sha256="0" * 64)

    code, out = run_cli(capsys, tampered(published, tmp_path / "a", far_results), "--run", rid, "--out", scratch)
    assert code == 1 and "MISMATCH" in out and "NOT REPRODUCED: 1 of 1 runs fail (1 MISMATCH)" in out

    def elsewhere(m):
        m["machines"][0]["machine"].update(cpu_model="Intel(R) Xeon(R) Platinum 8480+", cpu_flags=["avx512_fp16"])

    code, out = run_cli(capsys, tampered(published, tmp_path / "b", lambda m: (far_results(m), elsewhere(m))),
                        "--run", rid, "--out", scratch)
    assert code == 1 and "OUTSIDE" in out and "differs from the published run in cpu_model, cpu_flags" in out
    # made elsewhere, untouched: still bitwise; made elsewhere, other bits: within the spread
    code, out = run_cli(capsys, tampered(published, tmp_path / "c", elsewhere), "--run", rid, "--out", scratch)
    assert code == 0 and "1 bitwise" in out

    def other_bits(m):
        elsewhere(m)
        m["runs"][rid]["results_sha256"] = "0" * 64

    code, out = run_cli(capsys, tampered(published, tmp_path / "d", other_bits), "--run", rid, "--out", scratch)
    assert code == 0 and "REPRODUCED: 1/1 runs pass (1 within spread)" in out

    def other_spec(m):
        m["runs"][rid]["variant_spec_sha256"] = "0" * 64

    code, out = run_cli(capsys, tampered(published, tmp_path / "e", other_spec), "--run", rid, "--out", scratch)
    assert code == 1 and "config differs" in out and "variant_spec" in out


def test_an_older_manifest_is_reproduced_from_its_run_directories(published, scratch, capsys, tmp_path):
    rid = _chosen(published, scratch)

    def version2(m):
        for key in ("runs", "machines", "runs_made_on", "manifest_made_on", "reproducibility"):
            m.pop(key)
        m["manifest_version"] = 2

    where = tampered(published, tmp_path, version2)
    code, out = run_cli(capsys, where, "--run", rid, "--out", scratch)
    assert code == 0 and "manifest version 2: the published runs are read from their run directories" in out
    assert "1 bitwise" in out
    code, out = run_cli(capsys, where, "--runs-root", tmp_path / "nowhere", "--out", scratch)
    assert code == 2 and "records no run configs" in out
    code, out = run_cli(capsys, where, "--run", "digits/resnet8/bn/base/seed9", "--out", scratch)
    assert code == 2 and "not a run of" in out

