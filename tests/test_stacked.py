"""K seeds stacked in one process (msr.training.stacked) train the same K models as K separate runs.

The reference is the trainer's step, written out: seed, build, SGD(momentum 0.9) over the
variant's groups; each step forward, cross-entropy + extra loss, backward, after_backward, step.
Noise is drawn by both paths from per-run generators, so the noisy variants are compared
number for number too. Float tolerance only: grouped convolutions sum in another order.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from msr.core.variants import VARIANTS, VariantSpec, build
from msr.training.stacked import StackedSeeds

K, B, STEPS, SIZE, DEPTH = 3, 8, 20, 8, 8
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: a second thread only adds contention on a shared machine (and the thread
    # count changes float sums; both paths get the same one)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(steps: int = STEPS):
    g = torch.Generator().manual_seed(123)  # never the global RNG: that one is the runs' noise
    xs = torch.randn(steps, K, B, 3, SIZE, SIZE, generator=g)
    ys = torch.randint(0, 10, (steps, K, B), generator=g)
    return xs, ys


def _eager_run(variant: str, seed: int, xs, ys, overrides: dict, in_channels: int = 3):
    torch.manual_seed(seed)
    v = build(variant, depth=DEPTH, num_classes=10, in_channels=in_channels, **overrides)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        total = F.cross_entropy(v.model(x).float(), y) + v.extra_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        v.after_backward()
        opt.step()
        losses.append(total.item())
    return v.model.state_dict(), losses


def _variants_to_check():
    out = []
    # msr_noise: noise drawn per model; bn: per-model batch statistics; nf_ws: a peer's net
    # (weight-standardized convs); msr + AGC: a hook that runs model by model on views
    agc = "agc" in {f.name for f in dataclasses.fields(VariantSpec)}
    for name, overrides, known in [
        ("msr", {}, True), ("msr_noise", {}, True), ("bn", {}, True),
        ("nf_ws", {}, "nf_ws" in VARIANTS), ("msr", {"agc": 0.01}, agc),
    ]:
        marks = [] if known else [pytest.mark.skip(reason=f"{name} {overrides} is not in the registry yet")]
        out.append(pytest.param(name, overrides, marks=marks, id=name + "".join(f"-{k}" for k in overrides)))
    return out


@pytest.mark.parametrize(("variant", "overrides"), _variants_to_check())
def test_stacked_seeds_match_separate_runs(variant, overrides):
    xs, ys = _data()
    stacked = StackedSeeds(variant, SEEDS, depth=DEPTH, num_classes=10, in_channels=3, overrides=overrides)
    stacked_losses = torch.stack([stacked.step(xs[t], ys[t]).total for t in range(STEPS)])  # (STEPS, K)
    assert torch.isfinite(stacked_losses).all()
    for i, seed in enumerate(SEEDS):
        state, losses = _eager_run(variant, seed, xs[:, i], ys[:, i], overrides)
        torch.testing.assert_close(stacked_losses[:, i], torch.tensor(losses), rtol=1e-4, atol=1e-5)
        mine = stacked.models[i].state_dict()  # model i's own modules are views of the stack
        assert mine.keys() == state.keys()
        for key, want in state.items():
            # weights, BatchNorm running stats and step counters alike
            torch.testing.assert_close(mine[key], want, rtol=1e-4, atol=1e-5, msg=lambda m, where=f"{variant} seed {seed}: {key}": f"{where}: {m}")
    # the models really did train apart: different seeds, different weights
    w = [dict(m.named_parameters())["fc.weight"] for m in stacked.models]
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("variant", ["bn", "msr_noise", "nf_ws", "gc"])
def test_in_float64_stacked_seeds_are_separate_runs_up_to_rounding(variant):
    """The same arithmetic, not just close numbers: in float64 (where rounding cannot grow to
    anything visible in 40 steps) the stacked models equal the separate runs to ~1e-15, so the
    float32 differences (~1e-7 a step, growing where a ReLU flips) are rounding alone."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(5)
        xs = torch.randn(40, K, B, 1, SIZE, SIZE, generator=g)
        ys = torch.randint(0, 10, (40, K, B), generator=g)
        stacked = StackedSeeds(variant, SEEDS, depth=DEPTH, num_classes=10, in_channels=1)
        for t in range(40):
            stacked.step(xs[t], ys[t])
        for i, seed in enumerate(SEEDS):
            state, _ = _eager_run(variant, seed, xs[:, i], ys[:, i], {}, in_channels=1)
            for key, want in state.items():
                if want.is_floating_point():
                    got = stacked.models[i].state_dict()[key]
                    assert float((got - want).abs().max()) <= 1e-10 * max(1.0, float(want.abs().max())), (seed, key)
    finally:
        torch.set_default_dtype(before)


def test_noise_is_drawn_per_model():
    stacked = StackedSeeds("msr_noise", SEEDS, depth=DEPTH, num_classes=10, in_channels=3)
    xs, _ = _data(1)
    feed = stacked._noise(xs[0])
    assert len(feed) == len(stacked._originals) > 0
    for eps in feed:  # (K, B, C, 1, 1): one factor per model, sample and channel
        assert eps.shape[:2] == (K, B) and ((eps >= 0.9) & (eps <= 1.1)).all()
        assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[1], eps[2])
    shared = StackedSeeds("msr_noise", SEEDS, depth=DEPTH, num_classes=10, in_channels=3, noise_rng="shared")
    for eps in shared._noise(xs[0]):
        assert eps.shape[:2] == (K, B) and not torch.equal(eps[0], eps[1])


def test_a_diverged_model_leaves_the_others_alone():
    xs, ys = _data(5)
    clean = StackedSeeds("msr", SEEDS, depth=DEPTH, num_classes=10, in_channels=3)
    broken = StackedSeeds("msr", SEEDS, depth=DEPTH, num_classes=10, in_channels=3)
    with torch.no_grad():
        dict(broken.models[1].named_parameters())["fc.weight"].fill_(float("nan"))  # a view: the stack sees it
    for t in range(5):
        clean_losses = clean.step(xs[t], ys[t]).total
        losses = broken.step(xs[t], ys[t]).total
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
    torch.testing.assert_close(losses[[0, 2]], clean_losses[[0, 2]])
    for i in (0, 2):
        for (name, a), b in zip(broken.models[i].state_dict().items(), clean.models[i].state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="distinct"):
        StackedSeeds("msr", [1, 1], depth=DEPTH)
    with pytest.raises(ValueError, match="noise_rng"):
        StackedSeeds("msr", [0, 1], depth=DEPTH, noise_rng="global")
    with pytest.raises(NotImplementedError, match="gain noise"):
        StackedSeeds("msr", [0, 1], depth=DEPTH, overrides={"gain_noise": 0.1})
    stacked = StackedSeeds("msr", [0, 1], depth=DEPTH, num_classes=10, in_channels=3)
    xs, ys = _data(1)
    with pytest.raises(ValueError, match="leading dim of 2 models"):
        stacked.step(xs[0], ys[0])  # K=3 batches for 2 models
