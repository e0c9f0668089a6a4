"""``msr train --cuda-graph`` (msr.training.step.GraphedStep) and the CUDA smoke test of every
variant.

On a CPU only the refusals run; the rest is marked ``gpu`` and needs CUDA (the device visit,
tools/gpu_session.sh, runs ``pytest -m gpu``). What the GPU tests hold the graph to: the same
updates as the eager step when the lr changes between steps (fp32, a few steps: float
tolerance), and the same training as ``msr train`` eagerly over a short digits run (bf16:
within bf16 noise)."""

from __future__ import annotations

import json

import pytest
import torch

from msr import catalog
from msr.cli import main as msr_main
from msr.core.variants import build
from msr.training.config import ConfigError, RunConfig
from msr.training.loop import train
from msr.training.step import GraphedStep, OneModel, TrainStep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def quiet(*_):
    pass


def _digits(tmp_path, **kw) -> RunConfig:
    values = dict(dataset="digits", arch="resnet8", epochs=3, data_root=str(tmp_path / "data"))
    values.update(kw)
    return RunConfig(**values)


# --------------------------------------------------------------------------- anywhere
def test_a_cuda_graph_needs_cuda_and_the_eager_step_it_captures(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda_graph.*needs a CUDA device"):
            _digits(tmp_path, cuda_graph=True).validate()
    with pytest.raises(ConfigError, match="compile"):
        _digits(tmp_path, cuda_graph=True, compile=True, device="cpu").validate()
    v = build("msr", depth=8)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(TrainStep(OneModel(v), opt))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_cli_says_why_without_cuda(tmp_path, capsys):
    code = msr_main(["train", "--dataset", "digits", "--cuda-graph", "--out", str(tmp_path / "r"),
                     "--data-root", str(tmp_path / "d")])
    assert code == 2 and "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- on a GPU
def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("variant", ["msr_noise", "bn"])
def test_graphed_step_follows_the_schedule_like_the_eager_step(variant):
    """fp32, the same init and batches, the lr changed by a MultiStepLR between steps (in the
    warm-up and after the capture): the graph's updates are the eager step's."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(12, 32, 3, 16, 16, generator=g).to(device)
    ys = torch.randint(0, 10, (12, 32), generator=g).to(device)

    def run(graphed: bool) -> torch.Tensor:
        torch.manual_seed(0)
        v = build(variant, depth=8)
        v.model.to(device)
        opt = torch.optim.SGD(v.param_groups(), momentum=0.9, fused=True)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 6, 9], gamma=0.3)
        step = TrainStep(OneModel(v, device_type="cuda"), opt)
        if graphed:
            step = GraphedStep(step)
        for x, y in zip(xs, ys, strict=True):
            step(x, y)
            sched.step()
        torch.cuda.synchronize()
        if graphed:
            assert step.captured
        return _params(v.model)

    eager = run(False)  # each seeds the init and, after it, the noise (the default generator: graph-safe)
    graph = run(True)
    assert torch.isfinite(graph).all()
    assert float((graph - eager).norm() / eager.norm()) < 1e-4


@pytest.mark.gpu
@cuda
def test_msr_train_cuda_graph_trains_like_eager_and_resumes(tmp_path):
    eager = train(_digits(tmp_path, device="cuda", variant="msr_noise"), tmp_path / "eager", log=quiet)
    said: list[str] = []
    cut = train(_digits(tmp_path, device="cuda", variant="msr_noise", cuda_graph=True), tmp_path / "graph",
                log=said.append, stop_after_epoch=1)
    assert cut["status"] == "interrupted"
    graph = train(_digits(tmp_path, device="cuda", variant="msr_noise", cuda_graph=True), tmp_path / "graph", log=said.append)
    assert any("resuming after epoch 1" in line for line in said)
    record = json.loads((tmp_path / "graph" / "config.json").read_text())
    assert record["train_path"] == "cuda_graph" and record["precision"] == "bf16"
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["cuda"] == torch.version.cuda
    assert graph["status"] == eager["status"] == "completed"
    # bf16 and cuDNN's nondeterminism: equal to the noise of two eager runs, not bitwise
    assert abs(graph["final_test_acc"] - eager["final_test_acc"]) < 0.05
    assert graph["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=0.25)


@pytest.mark.gpu
@cuda
def test_stacked_seeds_with_a_cuda_graph(tmp_path):
    from msr.training.stacked_loop import train_stacked

    cfgs = [_digits(tmp_path, device="cuda", variant="msr_noise", seed=s, cuda_graph=True, epochs=2) for s in (0, 1)]
    outs = [tmp_path / f"seed{s}" for s in (0, 1)]
    summaries = train_stacked(cfgs, outs, log=quiet)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert json.loads((outs[0] / "config.json").read_text())["train_path"] == "stacked_cuda_graph"
    alone = train(_digits(tmp_path, device="cuda", variant="msr_noise", seed=1, epochs=2), tmp_path / "alone", log=quiet)
    assert abs(summaries[1]["final_test_acc"] - alone["final_test_acc"]) < 0.05


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")  # digits prepared once for the 32 smoke runs


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
@pytest.mark.parametrize("variant", list(catalog.VARIANTS))
def test_every_variant_trains_on_cuda(tmp_path, digits_root, variant, graph):
    """The CUDA smoke test: 2 digits epochs of each variant, eager and captured; a run may
    diverge (some variants do at these settings: a result), never crash."""
    cfg = _digits(digits_root, device="cuda", variant=variant, epochs=2, image_size=8, cuda_graph=graph)
    summary = train(cfg, tmp_path / "run", log=quiet)
    assert summary["status"] in ("completed", "diverged")
    assert summary["epochs_completed"] == 2 or summary["status"] == "diverged"
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "metrics.csv").exists()
