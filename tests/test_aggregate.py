"""msr.analysis.aggregate and msr.analysis.manifest on fake run directories in the exact format of `msr train`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from msr.analysis import aggregate as agg
from msr.analysis import figures, manifest
from msr.cli import main as msr_main
from msr.training.rundir import METRIC_COLUMNS, RunDirError

SPEC_FIELDS = {"name": "msr", "description": "nf + ZMI + ZMG", "claim": "2, 3", "norm": "none",
               "affine": True, "init": "zmi", "grad": "project", "granularity": "channel", "lam": 1.0,
               "cmrr_m": 0.9, "scope": "all", "noise_delta": 0.0, "noise_dist": "uniform",
               "noise_placement": "block_input", "gain_noise": 0.0, "lr": 0.4, "other_lr": 0.1,
               "weight_decay": 0.0, "unity_kappa": 5e-4, "zmi_norm": 1.0, "gain_init": 0.8}


def write_fake_run(root: Path, *, dataset="digits", arch="resnet20", variant="msr", tag="base", seed=0,
                   status="completed", final_test_acc=0.9, final_train_acc=0.95, epochs=3, lr=0.4,
                   batch_size=64, noise_delta=0.0, step_seconds=0.01, diverged_at_step=None) -> Path:
    """One run directory as `msr train` writes it (config.json, metrics.csv, probes.csv, summary.json)."""
    run = Path(root) / dataset / arch / variant / tag / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = 10
    config = {
        "dataset": dataset, "arch": arch, "variant": variant, "epochs": epochs, "seed": seed, "lr": lr,
        "batch_size": batch_size, "noise_delta": noise_delta, "image_size": 8, "threads": 1, "device": "cpu",
        "data_root": "data", "probe_every": 5, "overrides": {}, "milestones": [0.5, 0.75],
        "variant_spec": {**SPEC_FIELDS, "name": variant, "lr": lr, "noise_delta": noise_delta},
        "versions": {"python": "3.11.9", "torch": "2.14.1", "msr": "0.1.0"}, "device_name": "x86_64",
    }
    (run / "config.json").write_text(json.dumps(config, indent=1))
    done_epochs = epochs if status == "completed" else max(0, epochs - 2)
    rows = []
    for e in range(1, done_epochs + 1):
        frac = e / epochs
        rows.append({"epoch": e, "step": e * steps_per_epoch, "lr": lr, "train_loss": 2.0 - frac,
                     "train_acc": final_train_acc * frac, "clean_train_loss": 1.9 - frac,
                     "clean_train_acc": (final_train_acc + 0.02) * frac, "test_loss": 2.1 - frac,
                     "test_acc": final_test_acc * frac, "seconds": 1.0, "images_per_s": 640.0})
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_csv(run / "metrics.csv", index=False)
    probes = []
    for step in range(0, done_epochs * steps_per_epoch + 1, 5):
        for i, layer in enumerate(["stem", "blocks.0.conv1", "blocks.0.conv2"]):
            probes.append({"step": step, "layer": layer, "metric": "mean_shift", "value": 0.1 * (i + 1) + step * 1e-3})
            probes.append({"step": step, "layer": layer, "metric": "slice_mean_rms", "value": 1e-8 * (step + 1)})
        probes.append({"step": step, "layer": "model", "metric": "logit_rms", "value": 1.0})
    pd.DataFrame(probes).to_csv(run / "probes.csv", index=False)
    last_acc = final_test_acc if status == "completed" else (final_test_acc * done_epochs / epochs if done_epochs else math.nan)
    summary = {
        "status": status, "final_test_acc": last_acc, "best_test_acc": last_acc,
        "best_epoch": done_epochs or None, "final_train_acc": final_train_acc if status == "completed" else math.nan,
        "final_train_loss": 1.0, "final_test_loss": 1.1,
        "final_clean_train_acc": final_train_acc + 0.02 if status == "completed" else math.nan,
        "final_clean_train_loss": 0.9,
        "diverged_at_step": diverged_at_step if status == "diverged" else None,
        "epochs_completed": done_epochs, "steps": done_epochs * steps_per_epoch, "wall_seconds": 3.0,
        "train_seconds": 2.0, "mean_step_seconds": step_seconds, "images_per_s": 640.0,
        "peak_memory_mb": 700.0, "peak_memory_kind": "process_max_rss", "n_params": 268746,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """3 msr seeds (0.90, 0.92, 0.94), bn: 2 completed + 1 diverged, plain: all diverged, one lr-sweep run."""
    root = tmp_path / "results" / "runs"
    for seed, acc in enumerate([0.90, 0.92, 0.94]):
        write_fake_run(root, variant="msr", seed=seed, final_test_acc=acc, final_train_acc=acc + 0.05)
    write_fake_run(root, variant="bn", seed=0, final_test_acc=0.95, lr=0.1)
    write_fake_run(root, variant="bn", seed=1, final_test_acc=0.97, lr=0.1)
    write_fake_run(root, variant="bn", seed=2, status="diverged", final_test_acc=0.5, lr=0.1, diverged_at_step=17)
    for seed in range(2):
        write_fake_run(root, variant="plain", seed=seed, status="diverged", lr=0.1, diverged_at_step=4 + seed)
    write_fake_run(root, variant="msr", tag="lr0.8", seed=0, lr=0.8, final_test_acc=0.8)
    return root


def test_load_runs_one_row_per_run_with_config_spec_and_summary(runs_root):
    runs = agg.load_runs(agg.find_run_dirs(runs_root), runs_root)
    assert len(runs) == 9
    assert runs["run_id"].is_unique
    row = runs[runs["run_id"] == "digits/resnet20/msr/lr0.8/seed0"].iloc[0]
    assert (row["tag"], row["sweep"], row["lr"], row["depth"]) == ("lr0.8", "lr", 0.8, 20)
    assert row["spec_init"] == "zmi" and row["spec_claim"] == "2, 3"
    assert row["version_torch"] == "2.14.1"
    assert json.loads(row["overrides"]) == {}
    assert {"status", "final_test_acc", "best_test_acc", "diverged_at_step", "mean_step_seconds",
            "peak_memory_mb", "train_test_gap", "diverged"} <= set(runs.columns)
    assert runs.loc[runs["variant"] == "plain", "diverged"].all()


def test_summarize_mean_std_ci_over_seeds(runs_root):
    runs = agg.load_runs(agg.find_run_dirs(runs_root), runs_root)
    summary = agg.summarize(runs)
    msr = summary[(summary["variant"] == "msr") & (summary["tag"] == "base")].iloc[0]
    x = np.array([0.90, 0.92, 0.94])
    assert msr["n"] == 3 and msr["n_completed"] == 3 and msr["n_diverged"] == 0
    assert msr["final_test_acc_mean"] == pytest.approx(x.mean())
    assert msr["final_test_acc_std"] == pytest.approx(x.std(ddof=1))  # 0.02
    # t_{0.975, 2} = 4.302653 (two-sided 95%, 2 degrees of freedom)
    assert msr["final_test_acc_ci95"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert msr["train_test_gap_mean"] == pytest.approx(0.05)
    assert msr["seeds"] == "0 1 2"


def test_summarize_counts_diverged_runs_and_keeps_them_out_of_the_mean(runs_root):
    summary = agg.summarize(agg.load_runs(agg.find_run_dirs(runs_root), runs_root))
    bn = summary[summary["variant"] == "bn"].iloc[0]
    assert (bn["n"], bn["n_completed"], bn["n_diverged"]) == (3, 2, 1)
    assert bn["divergence_rate"] == pytest.approx(1 / 3)
    assert bn["final_test_acc_mean"] == pytest.approx(0.96)  # the diverged seed's 0.3 is not averaged in
    assert bn["median_diverged_at_step"] == 17
    plain = summary[summary["variant"] == "plain"].iloc[0]  # every seed diverged: the row is still there
    assert (plain["n"], plain["n_completed"], plain["n_diverged"]) == (2, 0, 2)
    assert math.isnan(plain["final_test_acc_mean"]) and plain["divergence_rate"] == 1.0
    assert plain["median_diverged_at_step"] == 4.5


def test_single_seed_has_no_std_or_ci(runs_root):
    summary = agg.summarize(agg.load_runs(agg.find_run_dirs(runs_root), runs_root))
    one = summary[summary["tag"] == "lr0.8"].iloc[0]
    assert one["n"] == 1 and one["final_test_acc_mean"] == pytest.approx(0.8)
    assert math.isnan(one["final_test_acc_std"]) and math.isnan(one["final_test_acc_ci95"])


def test_mean_std_ci_ignores_non_finite_values():
    mean, std, ci, n = agg.mean_std_ci([1.0, 3.0, math.nan, math.inf, None])
    assert (mean, n) == (2.0, 2)
    assert std == pytest.approx(math.sqrt(2))
    assert ci == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2), rel=1e-5)
    assert agg.mean_std_ci([])[3] == 0


def test_curves_stack_metrics_with_run_keys(runs_root):
    runs = agg.load_runs(agg.find_run_dirs(runs_root), runs_root)
    curves = agg.load_curves(runs)
    # completed runs have 3 epochs, diverged ones 1
    assert len(curves) == 6 * 3 + 3 * 1
    assert {"run_id", "variant", "seed", "epoch", "test_acc", "lr", "run_lr"} <= set(curves.columns)
    assert curves.groupby("run_id")["epoch"].max().max() == 3


def test_cli_writes_tables_and_accepts_explicit_runs(runs_root, tmp_path):
    out = tmp_path / "tables"
    assert msr_main(["aggregate", "--runs", str(runs_root), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"runs.csv", "summary.csv", "curves.csv"}
    assert len(pd.read_csv(out / "runs.csv")) == 9
    # explicit summary.json paths (what the Snakemake rule passes): only those runs
    picked = sorted(runs_root.glob("digits/resnet20/msr/base/seed*/summary.json"))
    assert msr_main(["aggregate", "--runs", str(runs_root), "--out", str(out), *map(str, picked)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert list(runs["run_id"]) == [f"digits/resnet20/msr/base/seed{s}" for s in range(3)]


def test_cli_refuses_an_incomplete_run(runs_root, tmp_path, capsys):
    broken = runs_root / "digits/resnet20/msr/base/seed0"
    (broken / "summary.json").unlink()
    assert msr_main(["aggregate", "--runs", str(runs_root), "--out", str(tmp_path / "t"), str(broken)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_sweep_of_tag():
    assert [agg.sweep_of_tag(t) for t in ["base", "lr0.05", "lr1e-05", "bs8", "d0.2", "d0", "odd"]] == \
        ["base", "lr", "lr", "batch_size", "noise_delta", "noise_delta", "other"]


def test_variant_order_and_colours_follow_the_registry():
    from msr.core.variants import VARIANTS

    assert list(VARIANTS) == list(figures.VARIANT_ORDER)
    assert len({figures.variant_color(v) for v in figures.VARIANT_ORDER}) == len(figures.VARIANT_ORDER)
    assert figures.variant_color("some_new_variant") == figures.variant_color("some_new_variant")
    assert figures.ordered_variants(["zz", "msr", "bn"]) == ["bn", "msr", "zz"]


def test_published_references_are_100_minus_the_published_errors():
    he = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.61}
    idelbayev = {"resnet20": 8.27, "resnet32": 7.37, "resnet44": 6.90, "resnet56": 6.61, "resnet110": 6.32}
    for name, errors in (("He et al. 2016", he), ("Idelbayev (PyTorch)", idelbayev)):
        refs = figures.PUBLISHED_REFERENCES[name]
        assert refs == {("cifar10", a): pytest.approx(100 - e) for a, e in errors.items()}


def test_table_formatting():
    assert figures.format_mean_std(0.9125, 0.0031, 5) == "91.25 ± 0.31 (n=5)"
    assert figures.format_mean_std(0.9, math.nan, 1, 2) == "90.00 (n=1, 2 diverged)"
    assert figures.format_mean_std(math.nan, math.nan, 0, 3) == "- (3 diverged)"
    frame = pd.DataFrame({"a_b": ["x|y", "50%"], "c": [1.5, math.nan]})
    md = figures.to_markdown(frame, notes=["note"])
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines()[:4]]
    assert cells[0] == ["a_b", "c"] and set(cells[1][0]) <= set(":-")
    assert cells[2:] == [["x\\|y", "1.5"], ["50%", ""]]
    assert md.rstrip().endswith("note")
    tex = figures.to_latex(frame, caption="T & more", label="tab:x")
    assert r"a\_b" in tex and r"50\%" in tex and r"T \& more" in tex and r"\label{tab:x}" in tex
    assert figures.latex_escape("±") == r"$\pm$"


def test_saved_figures_are_byte_identical_on_rerun(tmp_path):
    import matplotlib.pyplot as plt

    digests = []
    for i in range(2):
        figures.figure_style()
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 3, 2], label="x")
        ax.legend()
        png, pdf = tmp_path / f"f{i}.png", tmp_path / f"f{i}.pdf"
        figures.save_figure(fig, png, pdf)
        plt.close(fig)
        digests.append((manifest.sha256_file(png), manifest.sha256_file(pdf)))
        assert b"CreationDate" not in pdf.read_bytes()
    assert digests[0] == digests[1]


def test_manifest_lists_files_hashes_and_runs(runs_root, tmp_path):
    figure_dir = tmp_path / "figures"
    figure_dir.mkdir()
    (figure_dir / "fig.png").write_bytes(b"png bytes")
    (figure_dir / "tab.csv").write_text("a,b\n1,2\n")
    prov = tmp_path / "prov"
    figures.write_provenance(prov / "fig.json", "fig", ["digits/resnet20/msr/base/seed1", "digits/resnet20/msr/base/seed0"],
                         ["figures/fig.png"], ["results/tables/runs.csv"])
    figures.write_provenance(prov / "tab.json", "tab", [], ["figures/tab.csv"])
    m = manifest.build_manifest([prov / "tab.json", prov / "fig.json"], runs_root=runs_root.relative_to(tmp_path),
                                config_sha256="abc", cwd=tmp_path)
    assert [i["name"] for i in m["items"]] == ["fig", "tab"]
    fig = m["items"][0]
    assert fig["kind"] == "figure" and m["items"][1]["kind"] == "table"
    assert fig["files"] == [{"path": "figures/fig.png", "sha256": manifest.sha256_file(figure_dir / "fig.png")}]
    assert fig["runs"] == ["digits/resnet20/msr/base/seed0", "digits/resnet20/msr/base/seed1"]
    assert m["config_sha256"] == "abc"
    cfg = runs_root / "digits/resnet20/msr/base/seed0/config.json"
    assert m["run_config_sha256"]["digits/resnet20/msr/base/seed0"] == manifest.sha256_file(cfg)
    assert "git_commit" in m and "git_dirty" in m
    # no timestamps: the same inputs give the same manifest
    again = manifest.build_manifest([prov / "fig.json", prov / "tab.json"], runs_root=runs_root.relative_to(tmp_path),
                                    config_sha256="abc", cwd=tmp_path)
    assert json.dumps(m) == json.dumps(again)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


@pytest.mark.parametrize("name, damage, reason", [
    ("metrics.csv", Path.unlink, "missing"),
    ("probes.csv", Path.unlink, "missing"),
    ("config.json", Path.unlink, "missing"),
    ("metrics.csv", _truncate, "truncated"),
    ("probes.csv", _truncate, "truncated"),
    ("config.json", lambda p: p.write_text("{"), "not valid JSON"),
    ("summary.json", lambda p: p.write_text('{"status": "completed", "final_test_acc": 0.9'), "not valid JSON"),
])
def test_a_damaged_listed_run_stops_aggregation_naming_run_and_file(runs_root, tmp_path, capsys, name, damage, reason):
    run = runs_root / "digits/resnet20/bn/base/seed2"  # a diverged run: still never dropped
    damage(run / name)
    assert msr_main(["aggregate", "--runs", str(runs_root), "--out", str(tmp_path / "tables")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"msr aggregate: error: {run / name}: {reason}"), err
    assert "digits/resnet20/bn/base/seed2" in err and "delete" in err
    assert not (tmp_path / "tables" / "runs.csv").exists()


def test_a_completed_run_whose_files_disagree_is_refused(runs_root):
    run = runs_root / "digits/resnet20/msr/base/seed1"
    metrics = pd.read_csv(run / "metrics.csv")
    metrics.iloc[:-1].to_csv(run / "metrics.csv", index=False)  # the last epoch's row is gone
    with pytest.raises(RunDirError, match="holds epochs 1..2, but summary.json says 3"):
        agg.load_runs([run], runs_root)


def test_curves_and_probes_never_drop_a_run_silently(runs_root):
    runs = agg.load_runs(agg.find_run_dirs(runs_root), runs_root)
    run = Path(runs["run_dir"][0])
    (run / "metrics.csv").unlink()
    with pytest.raises(RunDirError, match="metrics.csv: missing"):
        agg.load_curves(runs)
    (run / "probes.csv").unlink()
    with pytest.raises(RunDirError, match="probes.csv: missing"):
        agg.load_probes([run])


def test_clean_train_accuracy_and_its_gap_reach_the_tables(runs_root):
    runs = agg.load_runs(agg.find_run_dirs(runs_root), runs_root)
    summary = agg.summarize(runs)
    msr = summary[(summary["variant"] == "msr") & (summary["tag"] == "base")].iloc[0]
    assert msr["final_clean_train_acc_mean"] == pytest.approx(np.mean([0.97, 0.99, 1.01]))
    assert msr["clean_train_test_gap_mean"] == pytest.approx(0.07)
    curves = agg.load_curves(runs)
    assert {"clean_train_loss", "clean_train_acc"} <= set(curves.columns)
