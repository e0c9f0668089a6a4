"""`msr bench` runs end to end and reports what it promises (never asserting on speed)."""

import json

import pytest
import torch

from msr.cli import main as msr_main
from msr.infra import bench
from msr.training.step import GraphedStep


@pytest.fixture(autouse=True)
def keep_threads():
    # `--threads` sets torch's global thread count in this process; give the next test its own
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TINY = ["--arch", "resnet8", "--batch-size", "8", "--n-train", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--threads", "1"]


# --------------------------------------------------------------------------- comparison table
def test_table_has_a_row_for_every_method_and_says_why_one_did_not_run(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert msr_main(["bench", *TINY, "--variant", "msr_noise", "--k", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(bench.METHODS)  # nothing silently missing
    for method in ("eager", "processes", "stacked"):
        r = rows[method]
        assert r["status"] == "ok" and r["ms_per_step"] > 0, method
        # images/s counts every model: K processes / K stacked seeds do K batches per step
        expect_models = 2 if method in ("processes", "stacked") else 1
        assert r["models"] == expect_models
        assert r["speedup_vs_eager"] == pytest.approx(r["images_per_s"] / rows["eager"]["images_per_s"])
    for method in ("eager", "stacked"):  # one process: images/s follows from ms/step
        r = rows[method]
        assert r["images_per_s"] == pytest.approx(r["models"] * 8 / (r["ms_per_step"] / 1e3))
    assert rows["eager"]["timing"] == "perf_counter"
    assert rows["cuda_graph"]["status"] == "not available on cpu"
    assert rows["compile_cudagraphs"]["status"] == "not available on cpu"
    assert rows["stacked_graph"]["status"] == "not available on cpu" and rows["stacked_graph"]["models"] == 2
    assert rows["processes_graph"]["status"] == "not available on cpu" and rows["processes_graph"]["models"] == 2
    assert rows["compile"]["status"] == "skipped" and "--compile-on-cpu" in rows["compile"]["note"]
    env = result["environment"]
    assert env["device"] == "cpu" and env["k"] == 2 and env["batch_size"] == 8 and env["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert "not available on cpu" in printed and "x eager" in printed and "stacked" in printed


def test_table_over_several_archs_and_variants(tmp_path):
    out = tmp_path / "t.json"
    args = [*TINY, "--arch", "resnet8,resnet14", "--variant", "bn,msr", "--methods", "eager,stacked", "--k", "2", "--device", "cpu", "--json", str(out)]
    assert msr_main(["bench", *args]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["variant"], r["method"]) for r in rows] == [
        (a, v, m) for a in ("resnet8", "resnet14") for v in ("bn", "msr") for m in ("eager", "stacked")
    ]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows)


def test_table_at_fashion_mnist_shape(tmp_path):
    out = tmp_path / "f.json"
    args = [*TINY, "--variant", "msr_noise", "--methods", "eager,processes,stacked", "--k", "2", "--device", "cpu",
            "--image-shape", "1,28,28", "--json", str(out)]
    assert msr_main(["bench", *args]) == 0
    result = json.loads(out.read_text())
    assert result["environment"]["image_shape"] == [1, 28, 28]
    assert [(r["method"], r["status"]) for r in result["rows"]] == [("eager", "ok"), ("processes", "ok"), ("stacked", "ok")]


def test_a_failing_method_is_reported_and_the_table_goes_on(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("capture failed\nsecond line")

    monkeypatch.setattr(bench, "bench_stacked", boom)
    out = tmp_path / "f.json"
    assert msr_main(["bench", *TINY, "--variant", "bn,msr", "--methods", "stacked,eager", "--k", "2", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["method"], r["status"]) for r in rows] == [
        ("bn", "stacked", "failed"), ("bn", "eager", "ok"), ("msr", "stacked", "failed"), ("msr", "eager", "ok"),
    ]
    assert rows[0]["note"] == "RuntimeError: capture failed"


@pytest.mark.slow
def test_compile_row_runs_on_cpu_when_asked(tmp_path):
    out = tmp_path / "c.json"
    assert msr_main(["bench", *TINY, "--variant", "msr", "--methods", "eager,compile", "--compile-on-cpu", "--device", "cpu", "--json", str(out)]) == 0
    compiled = json.loads(out.read_text())["rows"][1]
    assert compiled["method"] == "compile" and compiled["status"] == "ok" and compiled["ms_per_step"] > 0
    assert "compilation" in compiled["note"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "nope"], "valid variants"),
        (["--methods", "eager,warp"], "valid methods"),
        (["--arch", "resnet9"], "6n+2"),
        (["--data-path", "--arch", "resnet8,resnet14"], "one arch and one variant"),
        (["--image-shape", "28,28"], "C,H,W"),
    ],
)
def test_bad_requests_are_named(args, message, capsys):
    assert msr_main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- data-path report
def test_data_path_reports_both_loops_and_shares(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = msr_main(["bench",
        "--data-path", "--arch", "resnet8", "--variant", "msr_noise", "--batch-size", "16", "--n-train", "64",
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


def test_data_path_without_noise_or_projection(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["--data-path", "--arch", "resnet8", "--variant", "bn", "--batch-size", "8", "--n-train", "32", "--steps", "1",
            "--warmup", "0", "--repeats", "1", "--no-conventional", "--data-root", str(tmp_path / "d"), "--out", str(out)]
    assert msr_main(["bench", *args]) == 0
    r = json.loads(out.read_text())
    assert r["noise_share"] is None and "conventional_images_per_s" not in r
    assert "none in this variant" in capsys.readouterr().out


# --------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel_diff(a: dict, b: dict) -> float:
    keys = [k for k, v in b.items() if v.is_floating_point()]
    num = sum((a[k].float() - b[k].float()).square().sum() for k in keys)
    den = sum(b[k].float().square().sum() for k in keys)
    return float((num / den).sqrt())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", ["msr", "bn"])
def test_cuda_graph_step_trains_like_the_eager_step(variant):
    """The captured whole step (forward, loss, backward, ZMG, fused SGD with a tensor lr) takes
    the eager step's updates: same init, same batches, fp32, a few steps."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, 64, 3, 32, 32, generator=g).to(device)
    ys = torch.randint(0, 10, (8, 64), generator=g).to(device)
    eager = bench.Stepper(bench._build_variant(variant, "resnet8", seed=0), device, None, channels_last=False)
    for x, y in zip(xs, ys, strict=True):
        eager(x, y)
    graphed = bench.GraphStepper(bench._build_variant(variant, "resnet8", seed=0), device, None, False, batch_size=64)
    graphed.capture(iter(zip(xs[:3], ys[:3], strict=True)), warmup=3)  # 3 real steps, then capture
    for x, y in zip(xs[3:], ys[3:], strict=True):
        loss = graphed(x, y)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert _rel_diff(graphed.model.state_dict(), eager.model.state_dict()) < 1e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", ["msr", "bn", "msr_noise"])
def test_captured_stacked_step_trains_like_the_stacked_step(variant):
    from msr.training.stacked import StackedSeeds

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, 2, 64, 3, 32, 32, generator=g).to(device)
    ys = torch.randint(0, 10, (8, 2, 64), generator=g).to(device)

    def make():
        return StackedSeeds(variant, [0, 1], depth=8, device=device)

    plain = make()
    for t in range(8):
        plain.step(xs[t], ys[t])
    captured = make()
    graphed = GraphedStep(captured.train_step, generators=captured._generators)  # per-model noise, registered
    for t in range(8):  # 3 eager warm-up steps, the capture, then replays
        graphed(xs[t], ys[t])
    torch.cuda.synchronize()
    assert graphed.captured
    for i in range(2):
        assert _rel_diff(captured.models[i].state_dict(), plain.models[i].state_dict()) < 1e-3


@pytest.mark.gpu
@cuda
def test_table_on_cuda_fills_every_row(tmp_path):
    out = tmp_path / "cuda.json"
    args = ["--arch", "resnet8", "--variant", "msr_noise", "--batch-size", "32", "--steps", "2", "--warmup", "2", "--repeats", "1",
            "--methods", "eager,cuda_graph,processes,processes_graph,stacked,stacked_graph", "--k", "2", "--device", "cuda",
            "--image-shape", "1,28,28", "--json", str(out)]
    assert msr_main(["bench", *args]) == 0
    rows = json.loads(out.read_text())["rows"]
    methods = ("eager", "cuda_graph", "processes", "processes_graph", "stacked", "stacked_graph")
    assert [(r["method"], r["status"]) for r in rows] == [(m, "ok") for m in methods]
    assert all(r["timing"] == "cuda events" for r in rows if r["method"] != "processes")
