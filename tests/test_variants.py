"""The variant registry and the invariants (docs/method.md) 4, 7 and 9 on real models."""

import pytest
import torch
import torch.nn.functional as F

from msr.core.method import slice_means
from msr.core.models import GainConv2d
from msr.core.variants import OVERRIDABLE, VARIANTS, build

REQUIRED = ["bn", "bn_noise", "plain", "nf", "zmi", "zmg", "msr", "msr_noise", "gc", "msr_cmrr"]
PEERS = ["msr_rs", "wn", "fixup", "skipinit", "nf_ws", "bn_preact"]  # details: test_peers.py


def test_registry_has_every_ablation():
    assert set(REQUIRED + PEERS) <= set(VARIANTS)


@pytest.mark.parametrize("name", REQUIRED + PEERS)
def test_every_variant_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    v = build(name, depth=8, num_classes=5, in_channels=1)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    before = [p.detach().clone() for p in v.model.parameters()]
    loss = F.cross_entropy(v.model(x), y) + v.extra_loss()
    loss.backward()
    v.after_backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, v.model.parameters(), strict=True))
    groups = v.param_groups()
    assert sum(len(g["params"]) for g in groups) == len(list(v.model.parameters()))
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(v.model.parameters()))
    assert groups[0]["name"] == "conv" and groups[0]["lr"] == v.spec.lr  # the lr a run reports


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants: bn, bn_noise"):
        build("batchnorm")
    with pytest.raises(ValueError, match="valid: .*lam"):
        build("msr", lambda_=0.5)
    with pytest.raises(ValueError, match="lam"):
        build("msr", lam=2.0)
    with pytest.raises(ValueError, match="granularity"):
        build("msr", granularity="pixel")
    with pytest.raises(ValueError, match="gain_noise"):
        build("bn", gain_noise=0.1)
    assert "lam" in OVERRIDABLE and "name" not in OVERRIDABLE


def test_recipes_match_method_md():
    bn = {g["name"]: g for g in build("bn").param_groups()}
    assert bn["conv"]["lr"] == 0.1 and bn["conv"]["weight_decay"] == 1e-4
    msr = build("msr")
    groups = {g["name"]: g for g in msr.param_groups()}
    assert groups["conv"]["lr"] == 0.4 and groups["other"]["lr"] == 0.1
    assert all(g["weight_decay"] == 0 for g in groups.values())
    conv_ids = {id(p) for p in groups["conv"]["params"]}
    gains = [m.log_gain for m in msr.model.modules() if isinstance(m, GainConv2d)]
    assert gains and all(id(g) in conv_ids for g in gains)
    assert id(msr.model.fc.weight) not in conv_ids and id(msr.model.stem.bias) not in conv_ids
    # --lr scales the base rate; the other group keeps its ratio (0.4 : 0.1)
    scaled = {g["name"]: g["lr"] for g in msr.param_groups(lr=0.8)}
    assert scaled == {"conv": 0.8, "other": pytest.approx(0.2)}


def test_affine_scheme_biases_only_on_stem_and_classifier():
    m = build("msr").model
    biased = {n for n, p in m.named_parameters() if n.endswith("bias")}
    assert biased == {"stem.bias", "fc.bias"}
    torch.testing.assert_close(m.blocks[0].conv1.gain, torch.full((16,), 0.8))


@pytest.mark.parametrize("name", ["zmi", "msr", "msr_noise", "msr_cmrr"])
def test_zmi_variants_start_zero_mean_unit_norm(name):
    m = build(name).model
    for conv in m.convs():
        assert slice_means(conv.weight).abs().max() < 1e-6
        torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.ones(conv.out_channels), atol=1e-5, rtol=0)


def test_nf_starts_unit_norm_but_not_zero_mean():
    m = build("nf").model
    conv = m.blocks[0].conv1
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)
    assert slice_means(conv.weight).abs().max() > 1e-3


def test_projection_scope():
    assert len(build("msr").projected) == 19  # stem + 18 residual convs of ResNet-20
    cmrr = build("msr_cmrr")
    assert len(cmrr.projected) == 18 and all(p is not cmrr.model.stem.weight for p in cmrr.projected)
    assert build("zmi").projected == [] and build("bn").projected == []


def _train(name, steps, *, seed=0, **overrides):
    torch.manual_seed(seed)
    v = build(name, depth=8, num_classes=4, in_channels=3, **overrides)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g) + 0.5  # inputs with a common mode
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(v.model(x), y) + v.extra_loss()).backward()
        v.after_backward()
        opt.step()
    v.optimizer = opt
    return v


def test_invariant4_msr_stays_on_the_isocline_zmi_drifts():
    msr = _train("msr", 200)
    assert max(slice_means(p).abs().max().item() for p in msr.projected) < 1e-5
    # the momentum buffers stay on the zero-mean subspace too
    buffers = [msr.optimizer.state[p]["momentum_buffer"] for p in msr.projected]
    assert max(slice_means(b).abs().max().item() for b in buffers) < 1e-6
    zmi = _train("zmi", 200)
    drift = max(slice_means(c.weight).abs().max().item() for c in zmi.model.convs())
    assert drift > 1e-3


def test_zmg_freezes_initial_slice_means():
    torch.manual_seed(0)
    initial = build("zmg", depth=8, num_classes=4)
    means0 = [slice_means(p).clone() for p in initial.projected]
    trained = _train("zmg", 50)
    for m0, p in zip(means0, trained.projected, strict=True):
        torch.testing.assert_close(slice_means(p), m0, atol=1e-5, rtol=0)


def test_invariant9_projection_touches_only_projected_params():
    torch.manual_seed(0)
    v = build("msr", depth=8)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    (F.cross_entropy(v.model(x), y) + v.extra_loss()).backward()
    projected = {id(p) for p in v.projected}
    others = {n: p.grad.clone() for n, p in v.model.named_parameters() if id(p) not in projected}
    assert "fc.weight" in others and any(n.endswith("log_gain") for n in others)
    v.after_backward()
    for n, p in v.model.named_parameters():
        if id(p) in projected:
            assert slice_means(p.grad).abs().max() < 1e-6
        else:
            assert torch.equal(p.grad, others[n]), n


@pytest.mark.parametrize("name", ["plain", "nf", "msr", "msr_noise", "gc"])
def test_invariant7_norm_free_eval_is_per_sample(name):
    torch.manual_seed(0)
    model = build(name, depth=8).model.eval()
    x = torch.randn(6, 3, 16, 16)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    other_batch = model(torch.cat([x[:3], torch.randn(5, 3, 16, 16) * 5]))[:3]
    torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_batch, alone[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PEERS)
def test_invariant7_peers_eval_is_per_sample_after_training(name):
    """As above, after two SGD steps: Fixup's classifier and last convs start at zero, so at init
    its outputs would be trivially batch-independent."""
    torch.manual_seed(0)
    v = build(name, depth=8)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    x = torch.randn(6, 3, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        (F.cross_entropy(v.model(x), torch.arange(6)) + v.extra_loss()).backward()
        v.after_backward()
        opt.step()
    model = v.model.eval()
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert alone.abs().max() > 0 and alone.std(dim=0).max() > 0
    other_batch = model(torch.cat([x[:3], torch.randn(5, 3, 16, 16) * 5]))[:3]
    torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_batch, alone[:3], atol=1e-5, rtol=1e-5)


def test_invariant7_bn_train_mode_depends_on_the_batch():
    torch.manual_seed(0)
    model = build("bn", depth=8).model.train()
    x = torch.randn(6, 3, 16, 16)
    a = model(x)[:3]
    b = model(torch.cat([x[:3], torch.randn(3, 3, 16, 16) * 5]))[:3]
    assert (a - b).abs().max() > 1e-3


def test_msr_train_equals_eval_noise_variants_do_not():
    torch.manual_seed(0)
    model = build("msr", depth=8).model
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model.train()(x), model.eval()(x), atol=0, rtol=0)
    noisy = build("msr_noise", depth=8).model
    assert not torch.equal(noisy.train()(x), noisy.eval()(x))
    assert torch.equal(noisy.eval()(x), noisy.eval()(x))


def test_unity_decay_covers_residual_filters_and_classifier_rows():
    v = build("msr", depth=8)
    assert v.extra_loss().item() == pytest.approx(0.0, abs=1e-9)  # everything starts at unit norm
    with torch.no_grad():
        v.model.fc.weight.mul_(2.0)
    assert v.extra_loss().item() == pytest.approx(5e-4 * 10, rel=1e-4)
    assert build("bn").extra_loss().item() == 0.0
    names = {id(p) for p in v.unity_decayed}
    assert id(v.model.stem.weight) not in names and id(v.model.fc.weight) in names
