"""`msr bench` runs end to end and reports what it promises (never asserting on speed)."""

import json

from msr.bench import main as bench_main


def test_bench_reports_both_loops_and_shares(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_main([
        "--arch", "resnet8", "--variant", "msr_noise", "--batch-size", "16", "--n-train", "64",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "0",
        "--data-root", str(tmp_path / "data"), "--out", str(out),
    ])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ["ours_images_per_s", "conventional_images_per_s", "speedup_vs_conventional", "grad_mod_share", "noise_share", "ours_data_ms", "conventional_data_ms"]:
        assert r[key] > 0, key
    assert r["speedup_vs_conventional"] == r["conventional_step_ms"] / r["ours_step_ms"]
    printed = capsys.readouterr().out
    assert "speed-up vs conventional" in printed and "gradient modification" in printed


def test_bench_without_noise_or_projection(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["--arch", "resnet8", "--variant", "bn", "--batch-size", "8", "--n-train", "32", "--steps", "1",
            "--warmup", "0", "--repeats", "1", "--no-conventional", "--data-root", str(tmp_path / "d"), "--out", str(out)]
    assert bench_main(args) == 0
    r = json.loads(out.read_text())
    assert r["noise_share"] is None and "conventional_images_per_s" not in r
    assert "none in this variant" in capsys.readouterr().out


def test_bench_rejects_unknown_variant(capsys):
    assert bench_main(["--variant", "nope"]) == 2
    assert "valid variants" in capsys.readouterr().err
