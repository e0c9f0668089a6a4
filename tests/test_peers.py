"""The peer baselines (docs/method.md, "Peers"): wn, fixup, skipinit, nf_ws, bn_preact, msr_rs, AGC.

Each test checks a property the peer's source states, on a small net; the generic per-variant
checks (build, one step, eval per-sample) are in test_variants.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msr.core import variants
from msr.core.method import adaptive_clip_gradients_, slice_means, unitwise_norm
from msr.core.models import (
    RELU_GAMMA,
    BasicBlock,
    FixupBlock,
    OptionAShortcut,
    PreActBlock,
    check_branches_can_start,
    deadlocked_branches,
    gamma_relu,
    kernel_parameter,
)
from msr.core.variants import VARIANTS, build
from msr.training.probes import Prober

PEERS = ["wn", "fixup", "skipinit", "nf_ws", "bn_preact", "msr_rs"]
NORMALIZER_FREE_PEERS = ["wn", "fixup", "skipinit", "nf_ws"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pooled(h: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


# --------------------------------------------------------------------------- registry
def test_peers_are_registered_with_their_claims():
    claims = {name: VARIANTS[name].claim for name in PEERS}
    assert claims == {"wn": "6", "fixup": "6", "skipinit": "6", "nf_ws": "peer", "bn_preact": "reference", "msr_rs": "stem"}
    # msr_rs is msr but for the projection's scope
    import dataclasses

    assert dataclasses.replace(VARIANTS["msr_rs"], name="msr", description=VARIANTS["msr"].description,
                               claim=VARIANTS["msr"].claim, scope="all") == VARIANTS["msr"]
    assert "mixup" in VARIANTS["fixup"].description  # the official default turns it on: say it is off


@pytest.mark.parametrize("name", PEERS)
@pytest.mark.parametrize("depth", [8, 20, 56, 110])
def test_builds_at_every_depth(name, depth):
    torch.manual_seed(0)
    model = build(name, depth=depth, num_classes=7, in_channels=3).model
    assert len(model.convs()) == depth - 1  # stem + 2 per block
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("name", NORMALIZER_FREE_PEERS)
def test_normalizer_free_peers_have_no_batch_statistics(name):
    model = build(name, depth=20).model
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in model.modules())
    assert not list(model.buffers())  # no running statistics of any kind


def test_bn_preact_is_the_nf_block_form_with_batchnorm():
    nf, bn = build("nf_ws", depth=20).model, build("bn_preact", depth=20).model
    assert [type(b) for b in nf.blocks] == [type(b) for b in bn.blocks] == [PreActBlock] * 9
    assert [b.transition for b in nf.blocks] == [b.transition for b in bn.blocks]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2 * 9 + 1  # 2 per block + final


def test_parameter_counts_follow_from_each_peers_extra_parameters():
    """ResNet-20, 3 -> 10 classes, against the plain (no BN, all convs biased) net.

    WN adds a g per conv channel and classifier row; Fixup drops the conv biases and
    adds 5 scalars per block + 2; SkipInit one scalar per block; NF gains per channel and a skip
    gain per block; msr_rs is msr.
    """
    for in_channels in (3, 1):
        count = {name: n_params(build(name, depth=20, in_channels=in_channels).model) for name in [*PEERS, "plain", "bn", "msr"]}
        channels = sum(c.out_channels for c in build("plain", depth=20, in_channels=in_channels).model.convs())
        assert channels == 688
        blocks, classes = 9, 10
        assert count["wn"] == count["plain"] + channels + classes
        assert count["fixup"] == count["plain"] - channels + 5 * blocks + 2
        assert count["skipinit"] == count["plain"] + blocks
        assert count["nf_ws"] == count["plain"] + channels + blocks
        assert count["bn_preact"] == count["bn"]  # the same number of BatchNorm channels, moved
        assert count["msr_rs"] == count["msr"]
    # the peers' extra parameters for ResNet-20 (3 input channels)
    plain = n_params(build("plain", depth=20).model)
    no_bias = plain - 688
    assert (n_params(build("wn", depth=20).model) - no_bias, n_params(build("fixup", depth=20).model) - no_bias,
            n_params(build("nf_ws", depth=20).model) - no_bias) == (1386, 47, 1385)


# --------------------------------------------------------------------------- zero-init deadlock
def test_build_refuses_a_zero_gate_on_a_zero_last_conv(monkeypatch):
    def deadlocked_fixup(model):
        variants._init_fixup(model)
        with torch.no_grad():
            model.blocks[1].scale.zero_()

    monkeypatch.setitem(variants._PEER_INITS, "fixup", deadlocked_fixup)
    with pytest.raises(ValueError, match=r"deadlock in blocks\.1: the branch gate and its last conv"):
        build("fixup", depth=8)


@pytest.mark.parametrize("name", ["fixup", "skipinit", "nf_ws"])
def test_each_gated_peer_zeroes_exactly_one_of_gate_and_last_conv(name):
    model = build(name, depth=8).model
    gated = [b for b in model.blocks if isinstance(getattr(b, "gate", None), torch.Tensor)]
    assert len(gated) == 3 and deadlocked_branches(model) == []
    for b in gated:
        gate_zero = not b.gate.any()
        last_zero = not b.conv2.weight.any()
        assert gate_zero != last_zero
    # zeroing the other one as well is exactly what the check refuses
    with torch.no_grad():
        for b in gated:
            b.gate.zero_()
            if hasattr(b.conv2, "parametrizations"):  # Scaled WS: a zero gain zeroes the kernel
                b.conv2.parametrizations.weight[0].gain.zero_()
            else:
                b.conv2.weight.zero_()
            if b.conv2.bias is not None:
                b.conv2.bias.zero_()
    assert deadlocked_branches(model) == [f"blocks.{i}" for i in range(3)]
    with pytest.raises(ValueError, match="deadlock"):
        check_branches_can_start(model)


def test_a_deadlocked_branch_really_gets_no_gradient():
    """Why the check exists: SkipInit's zero gate with a zeroed last conv never moves."""
    torch.manual_seed(0)
    model = build("skipinit", depth=8).model
    block = model.blocks[0]
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4)).backward()
    assert not block.gate.grad.any() and not block.conv2.weight.grad.any() and not block.conv1.weight.grad.any()
    assert model.blocks[1].gate.grad.any()  # an intact branch does get one


# --------------------------------------------------------------------------- fixup
def test_fixup_init_follows_the_official_code():
    torch.manual_seed(0)
    model = build("fixup", depth=56).model
    L = model.num_residual_blocks
    assert L == 27
    for b in model.blocks:
        assert isinstance(b, FixupBlock) and torch.count_nonzero(b.conv2.weight) == 0
        out_ch = b.conv1.out_channels
        expected = math.sqrt(2 / (out_ch * 9)) * L**-0.5
        assert b.conv1.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert b.scale.item() == 1 and all(getattr(b, n).item() == 0 for n in ("bias1a", "bias1b", "bias2a", "bias2b"))
    assert not model.fc.weight.any() and not model.fc.bias.any()
    # the stem keeps PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(3 * 9)
    assert model.stem.weight.abs().max() <= bound and model.stem.weight.abs().max() > 0.9 * bound


def fixup_skip_path(model, x):
    """The Fixup net with every residual branch removed: stem, then each block's skip."""
    h = F.relu(model.stem(x) + model.bias1)
    for b in model.blocks:
        h = F.relu(b.skip(h))
    return h


def test_fixup_branches_are_zero_at_init_so_the_net_is_its_skip_path():
    torch.manual_seed(0)
    model = build("fixup", depth=20).model
    x = torch.randn(4, 3, 16, 16)
    h = F.relu(model.stem(x) + model.bias1)
    for b in model.blocks:
        assert torch.count_nonzero(b.branch(h)) == 0
        h = b(h)
    torch.testing.assert_close(h, fixup_skip_path(model, x), atol=0, rtol=0)
    logits = model(x)
    assert not logits.any()  # zero classifier
    assert F.cross_entropy(logits, torch.arange(4)).item() == pytest.approx(math.log(10))


def test_fixup_branches_start_training_in_stages():
    """fc = 0 blocks every gradient at the first backward; conv2 = 0 blocks conv1 and the
    multiplier at the second; from the third, every branch parameter moves (the official Fixup code)."""
    torch.manual_seed(0)
    v = build("fixup", depth=8, num_classes=4)
    model = v.model
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))

    def step() -> dict[str, torch.Tensor]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        return grads

    g1 = step()
    assert {n for n, g in g1.items() if g.any()} == {"fc.weight", "fc.bias"}
    g2 = step()
    for i in range(len(model.blocks)):
        assert g2[f"blocks.{i}.conv2.weight"].any() and g2[f"blocks.{i}.bias2b"].any()
        assert not g2[f"blocks.{i}.conv1.weight"].any() and not g2[f"blocks.{i}.scale"].any()
    h = F.relu(model.stem(x) + model.bias1)
    for b in model.blocks:  # after two steps every branch outputs something
        assert b.branch(h).abs().max() > 0
        h = b(h)
    g3 = step()
    for i in range(len(model.blocks)):
        assert g3[f"blocks.{i}.conv1.weight"].any() and g3[f"blocks.{i}.scale"].any()


def test_fixup_scalars_train_at_a_tenth_of_the_lr_with_weight_decay():
    v = build("fixup", depth=20)
    groups = {g["name"]: g for g in v.param_groups()}
    assert [g["name"] for g in v.param_groups()] == ["conv", "other", "scalar"]  # group 0: the reported lr
    scalars = {id(p) for p in groups["scalar"]["params"]}
    names = {n for n, p in v.model.named_parameters() if id(p) in scalars}
    assert names == {n for n, _ in v.model.named_parameters() if "bias" in n or n.endswith("scale")}  # the official rule
    assert len(names) == 5 * 9 + 2 + 1  # + fc.bias
    assert id(v.model.fc.weight) in {id(p) for p in groups["other"]["params"]}
    assert groups["scalar"]["lr"] == pytest.approx(groups["conv"]["lr"] / 10)
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())
    scaled = {g["name"]: g["lr"] for g in v.param_groups(lr=0.2)}
    assert scaled == {"conv": 0.2, "other": pytest.approx(0.2), "scalar": pytest.approx(0.02)}


# --------------------------------------------------------------------------- skipinit
def test_skipinit_branches_are_zero_at_init_so_the_net_is_its_skip_path():
    torch.manual_seed(0)
    model = build("skipinit", depth=20).model
    x = torch.randn(4, 3, 16, 16)
    h = F.relu(model.stem(x))
    skip = h
    for b in model.blocks:
        assert isinstance(b, BasicBlock) and b.gate.item() == 0
        assert torch.count_nonzero(b.branch(h)) == 0
        h, skip = b(h), F.relu(b.shortcut(skip))
    torch.testing.assert_close(h, skip, atol=0, rtol=0)
    torch.testing.assert_close(model(x), model.fc(pooled(skip)), atol=0, rtol=0)


def test_skipinit_gates_get_gradients_at_once_and_open_the_branches():
    torch.manual_seed(0)
    v = build("skipinit", depth=8, num_classes=4)
    model = v.model
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    for b in model.blocks:
        assert b.gate.grad.abs().item() > 0
        # while the gate is 0, nothing behind it moves
        assert not b.conv1.weight.grad.any() and not b.conv2.weight.grad.any()
    opt.step()
    opt.zero_grad()
    h = F.relu(model.stem(x))
    for b in model.blocks:
        assert b.gate.item() != 0 and b.branch(h).abs().max() > 0
        h = b(h)
    F.cross_entropy(model(x), y).backward()
    for b in model.blocks:
        assert b.conv1.weight.grad.any() and b.conv2.weight.grad.any()


def test_skipinit_is_plain_plus_gates():
    torch.manual_seed(3)
    plain = build("plain", depth=8).model.state_dict()
    torch.manual_seed(3)
    skip = build("skipinit", depth=8).model.state_dict()
    gates = {k for k in skip if k.endswith(".gate")}
    assert len(gates) == 3 and set(skip) - gates == set(plain)
    assert all(torch.equal(skip[k], plain[k]) for k in plain)  # same init, same RNG use
    groups = {g["name"]: g for g in build("skipinit").param_groups()}
    assert set(groups) == {"conv", "other"} and all(g["weight_decay"] == 1e-4 and g["lr"] == 0.1 for g in groups.values())


# --------------------------------------------------------------------------- wn
def test_wn_effective_norm_per_unit_is_g():
    torch.manual_seed(0)
    model = build("wn", depth=8).model
    layers = [*model.convs(), model.fc]
    assert all(hasattr(layer, "parametrizations") for layer in layers)
    with torch.no_grad():
        for layer in layers:  # arbitrary g, so the check is not the init's
            layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    for layer in layers:
        g = layer.parametrizations.weight.original0.flatten()
        torch.testing.assert_close(layer.weight.flatten(1).norm(dim=1), g, atol=1e-6, rtol=1e-6)


def test_wn_output_is_invariant_to_rescaling_v():
    torch.manual_seed(0)
    model = build("wn", depth=8).model.eval()
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    with torch.no_grad():
        for layer in [*model.convs(), model.fc]:
            v = kernel_parameter(layer)
            v.mul_(torch.rand(v.shape[0], *([1] * (v.dim() - 1))) * 5 + 0.1)  # a positive factor per unit
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_wn_init_is_arpit_et_al():
    torch.manual_seed(0)
    model = build("wn", depth=20).model

    def g(conv):
        return conv.parametrizations.weight.original0.flatten()

    torch.testing.assert_close(g(model.stem), torch.full((16,), math.sqrt(2 * 27 / 144)))
    for b in model.blocks:
        fan_ratio = b.conv1.in_channels / b.conv1.out_channels
        torch.testing.assert_close(g(b.conv1), torch.full((b.conv1.out_channels,), math.sqrt(2 * fan_ratio)))
        torch.testing.assert_close(g(b.conv2), torch.full((b.conv2.out_channels,), math.sqrt(1 / 3)))
        v = kernel_parameter(b.conv1).flatten(1)  # orthogonal rows
        torch.testing.assert_close(v @ v.T, torch.eye(v.shape[0]), atol=1e-5, rtol=0)
        assert not b.conv1.bias.any() and not b.conv2.bias.any()
    # the classifier keeps PyTorch's default function, only reparametrized
    torch.testing.assert_close(g(model.fc), kernel_parameter(model.fc).norm(dim=1))


def test_wn_decays_v_but_not_g_or_biases():
    v = build("wn", depth=8)
    groups = {g["name"]: g for g in v.param_groups()}
    ids = lambda group: {id(p) for p in groups[group]["params"]}  # noqa: E731
    for layer in [*v.model.convs(), v.model.fc]:
        plist = layer.parametrizations.weight
        assert id(plist.original1) in ids("conv") | ids("other")
        assert id(plist.original0) in ids("scalar") and id(layer.bias) in ids("scalar")
    assert groups["conv"]["weight_decay"] == groups["other"]["weight_decay"] == 1e-4
    assert groups["scalar"]["weight_decay"] == 0


@pytest.mark.parametrize("name", PEERS)
def test_probes_measure_every_conv_of_every_peer(name):
    torch.manual_seed(0)
    model = build(name, depth=8).model
    rows = Prober(model, torch.randn(4, 3, 8, 8))(0)
    shifts = {layer for _, layer, metric, _ in rows if metric == "mean_shift"}
    assert len(shifts) == 7  # stem + 6 residual convs
    assert all(math.isfinite(value) for *_, value in rows)
    if name == "wn":  # the probe sees the effective kernel: its filter norm is g
        norms = {layer: value for _, layer, metric, value in rows if metric == "filter_norm"}
        assert norms["blocks.0.conv2"] == pytest.approx(math.sqrt(1 / 1), rel=1e-5)  # 1 block per stage at depth 8


# --------------------------------------------------------------------------- nf_ws
def test_scaled_ws_filters_have_mean_zero_and_variance_gain_squared_over_fan_in():
    torch.manual_seed(0)
    model = build("nf_ws", depth=8).model
    with torch.no_grad():
        for conv in model.convs():
            kernel_parameter(conv).mul_(3.0).add_(0.7)  # any scale and offset of the raw W
            conv.parametrizations.weight[0].gain.uniform_(0.5, 2.0)
    for conv in model.convs():
        w = conv.weight.flatten(1)
        fan_in = w.shape[1]
        gain = conv.parametrizations.weight[0].gain
        assert w.mean(dim=1).abs().max() < 1e-6
        torch.testing.assert_close(w.var(dim=1, correction=0) * fan_in, gain.square(), atol=1e-5, rtol=1e-5)


def test_gamma_relu_has_unit_variance():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    assert gamma_relu(z).var().item() == pytest.approx(1.0, abs=0.01)
    assert RELU_GAMMA == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-3)


def block_variances(model, x) -> list[float]:
    """Channel-averaged variance (over N, H, W) of every block's output, and of its live
    channels (those not identically zero: option A pads zeros)."""
    out = []

    def hook(_m, _i, o):
        per_channel = o.transpose(0, 1).flatten(1).var(dim=1)
        out.append((per_channel.mean().item(), per_channel[per_channel > 0].mean().item()))

    handles = [b.register_forward_hook(hook) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("depth", [20, 56])
def test_nf_ws_signal_propagation_keeps_variance_order_one(depth):
    """On unit-normal input: with the skip gains at their init 0 (the net is stem + skips) every
    live channel's variance stays O(1); with the skip gains at 1 (the regime the beta schedule
    assumes) the channel-averaged variance after each block follows ``expected_vars``."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build("nf_ws", depth=depth).model.eval()
    x = torch.randn(8, 3, 32, 32)  # 32 x 32, so stage 3 (8 x 8) is not mostly zero-padded border
    for _, live in block_variances(model, x):
        assert 0.25 < live < 4
    with torch.no_grad():
        for b in model.blocks:
            b.skip_gain.fill_(1.0)
    measured = block_variances(model, x)
    for (mean_var, _), expected in zip(measured, model.expected_vars, strict=True):
        assert 0.25 < mean_var < 4
        assert mean_var == pytest.approx(expected, rel=0.25)


def test_nf_ws_beta_schedule():
    model = build("nf_ws", depth=20).model
    betas = [b.beta for b in model.blocks]
    # 1 + alpha^2 per block; a transition restarts from in/out = 1/2 (zeros on the new channels)
    expected_in = [1.0, 1.04, 1.08, 1.12, 0.54, 0.58, 0.62, 0.54, 0.58]
    assert betas == pytest.approx([v**-0.5 for v in expected_in])
    assert all(b.alpha == 0.2 and b.skip_gain.item() == 0 for b in model.blocks)


def test_nf_ws_transition_skip_is_the_scaled_unrectified_input():
    """Option A has no conv to remove a ReLU's mean, so the transition's skip carries h * beta."""
    torch.manual_seed(0)
    model = build("nf_ws", depth=8).model
    block = model.blocks[1]
    assert block.transition and block.beta != 1
    h = torch.randn(4, 16, 8, 8)
    expected = OptionAShortcut(16, 32, 2)(h * block.beta)
    torch.testing.assert_close(block(h), expected, atol=0, rtol=0)  # skip gain 0: the skip alone
    assert (block(h) < 0).any()  # not rectified


def test_nf_ws_with_zero_skip_gains_is_stem_plus_skips():
    torch.manual_seed(0)
    model = build("nf_ws", depth=20).model
    x = torch.randn(4, 3, 16, 16)
    h = model.stem(x)
    for b in model.blocks:
        h = b.skip(h, b.pre(h))
    torch.testing.assert_close(model(x), model.fc(pooled(gamma_relu(h))), atol=0, rtol=0)


def test_nf_ws_groups_exempt_gains_and_biases_from_decay():
    v = build("nf_ws", depth=8)
    groups = {g["name"]: g for g in v.param_groups()}
    scalar = {id(p) for p in groups["scalar"]["params"]}
    names = {n for n, p in v.model.named_parameters() if id(p) in scalar}
    assert names == {n for n, _ in v.model.named_parameters() if n.endswith(("gain", "bias"))}
    assert groups["scalar"]["weight_decay"] == 0 and groups["conv"]["weight_decay"] == 1e-4
    assert id(v.model.fc.weight) in {id(p) for p in groups["other"]["params"]}


# --------------------------------------------------------------------------- AGC
def test_agc_clips_exactly_the_units_over_the_threshold():
    lam = 0.1
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [6.0, 8.0]]))
    w.grad = torch.tensor([[3.0, 0.0], [0.0, 0.05], [1.0, 1.0], [0.3, 0.4]])
    before = w.grad.clone()
    b = torch.nn.Parameter(torch.tensor([1.0, 1.0]))  # a vector: clipped as one unit
    b.grad = torch.tensor([3.0, 4.0])
    adaptive_clip_gradients_([w, b], lam)
    # row 0: |G| 3 > 0.1 * 5 -> rescaled to 0.5, direction kept
    torch.testing.assert_close(w.grad[0], torch.tensor([0.5, 0.0]))
    # row 1: |G| 0.05 < 0.1 * 1 -> untouched, bitwise
    assert torch.equal(w.grad[1], before[1])
    # row 2: |W| = 0 -> the floor eps = 1e-3 sets the threshold: 1e-4
    assert w.grad[2].norm().item() == pytest.approx(lam * 1e-3, rel=1e-6)
    torch.testing.assert_close(w.grad[2] / w.grad[2].norm(), before[2] / before[2].norm())
    # row 3: |G| 0.5 < 0.1 * 10 -> untouched, bitwise
    assert torch.equal(w.grad[3], before[3])
    assert b.grad.norm().item() == pytest.approx(lam * math.sqrt(2), rel=1e-6)
    assert unitwise_norm(torch.ones(2, 3, 1, 1)).shape == (2, 1, 1, 1)


def test_agc_override_works_on_any_variant_and_spares_the_classifier_weight():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for name in ["msr", "nf_ws", "bn", "wn"]:
        torch.manual_seed(0)
        v = build(name, depth=8, agc=1e-3)
        (F.cross_entropy(v.model(x), y) + v.extra_loss()).backward()
        v_fc = kernel_parameter(v.model.fc)
        fc_grad = v_fc.grad.clone()
        v.after_backward()
        assert torch.equal(v_fc.grad, fc_grad)
        clipped = 0
        for p in v.agc_clipped:
            limit = unitwise_norm(p.detach()).clamp_min(1e-3) * 1e-3
            assert (unitwise_norm(p.grad) <= limit * (1 + 1e-5)).all()
            clipped += 1
        assert clipped == len(list(v.model.parameters())) - 1
    assert build("nf_ws").agc_clipped == []  # 0 = off
    with pytest.raises(ValueError, match="agc"):
        build("nf_ws", agc=-1.0)


def test_agc_keeps_msr_on_the_isocline():
    torch.manual_seed(0)
    v = build("msr", depth=8, agc=1e-3)
    F.cross_entropy(v.model(torch.randn(4, 3, 8, 8) + 0.5), torch.arange(4)).backward()
    v.after_backward()
    assert max(slice_means(p.grad).abs().max().item() for p in v.projected) < 1e-7


# --------------------------------------------------------------------------- invalid combinations
@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("fixup", {"grad": "project"}, "grad"),
        ("nf_ws", {"noise_delta": 0.1}, "noise"),
        ("wn", {"weight_norm": False}, "arpit"),
        ("plain", {"init": "fixup"}, "fixup"),
        ("bn_preact", {"init": "nf"}, "nf"),
        ("msr", {"block": "preact"}, "affine"),
        ("wn", {"scalar_lr": -1.0}, "scalar_lr"),
        ("nf_ws", {"nf_alpha": 0.0}, "nf_alpha"),
    ],
)
def test_invalid_peer_combinations_are_named(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(name, depth=8, **overrides)


# --------------------------------------------------------------------------- msr vs msr_rs: the stem and colour
def colour_data(n: int, gen: torch.Generator, size: int = 16):
    """Four classes that differ only by a per-channel colour offset on unit-normal noise."""
    colours = torch.tensor([[0.8, -0.8, 0.0], [-0.8, 0.8, 0.0], [0.0, 0.8, -0.8], [0.8, 0.0, 0.8]])
    y = torch.randint(0, 4, (n,), generator=gen)
    return torch.randn(n, 3, size, size, generator=gen) + colours[y].view(n, 3, 1, 1), y


def train_on_colour(name: str, steps: int = 200):
    torch.manual_seed(0)
    v = build(name, depth=8, num_classes=4)
    opt = torch.optim.SGD(v.param_groups(), momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = colour_data(32, gen)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(v.model(x), y) + v.extra_loss()).backward()
        v.after_backward()
        opt.step()
    return v.model.eval()


def test_msr_and_msr_rs_are_identical_at_init():
    torch.manual_seed(5)
    a = build("msr", depth=20)
    torch.manual_seed(5)
    b = build("msr_rs", depth=20)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert slice_means(b.model.stem.weight).abs().max() < 1e-6  # ZMI makes both stems zero-mean
    assert len(a.projected) == 19 and len(b.projected) == 18
    assert all(p is not b.model.stem.weight for p in b.projected)


def test_a_colour_shift_reaches_msr_only_through_the_border(capsys):
    """After training where colour is the label, a global per-channel colour shift of the input
    changes msr's stem output only at the zero-padded border (its stem stays zero-mean); msr_rs's
    stem left the zero-mean subspace, so its interior changes as much as the rest."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2)
    x, _ = colour_data(128, gen)
    shift = torch.tensor([0.5, -0.5, 0.3]).view(1, 3, 1, 1)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    result = {}
    for name in ["msr", "msr_rs"]:
        model = train_on_colour(name)
        with torch.no_grad():
            s0, s1 = model.stem(x), model.stem(x + shift)
            p0, p1 = (pooled(model.blocks(F.relu(s))) for s in (s0, s1))
        inner = (..., slice(1, -1), slice(1, -1))
        result[name] = dict(interior=rel(s1[inner], s0[inner]), whole=rel(s1, s0), pooled=rel(p1, p0),
                            stem_slice_mean=slice_means(model.stem.weight).abs().max().item())
    with capsys.disabled():
        print(f"\ncolour shift, relative change: {result}")
    msr, rs = result["msr"], result["msr_rs"]
    assert msr["stem_slice_mean"] < 1e-5 and rs["stem_slice_mean"] > 1e-3
    assert msr["interior"] < 1e-5 and msr["whole"] > 100 * msr["interior"]  # the border only
    assert rs["interior"] > 0.05 and rs["interior"] > 0.5 * rs["whole"]
    assert rs["pooled"] > msr["pooled"]
