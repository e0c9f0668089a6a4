"""the invariants (docs/method.md) 1, 2, 3, 5, 6 and 9: ZMI, ZMG, cmrr, noise - for any shape."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msr.core.method import (
    BlockInputNoise,
    cmrr_gradients_,
    project_gradients_,
    slice_means,
    unity_decay,
    zero_mean_init_,
)

conv_shapes = st.tuples(
    st.integers(1, 12), st.integers(1, 12), st.sampled_from([2, 3, 5]), st.sampled_from([2, 3, 5])
)


def _param_with_grad(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
    # a gradient with a large common mode, as a real conv gradient often has
    p.grad = torch.randn(shape, generator=g, dtype=dtype) + 3.0
    return p


# ------------------------------------------------------------------ invariant 1: ZMI
@given(shape=conv_shapes, norm=st.floats(0.1, 10.0))
@settings(max_examples=40, deadline=None)
def test_zmi_zero_slice_means_and_filter_norm(shape, norm):
    w = torch.empty(shape)
    out = zero_mean_init_(w, norm=norm)
    assert out is w
    assert slice_means(w).abs().max() < 1e-6
    torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.full((shape[0],), norm), atol=1e-5 * norm, rtol=0)


def test_zmi_draws_from_uniform_then_centres():
    # before rescaling, elements come from U(-1, 1): the centred values are not all equal and the
    # directions of two seeds differ; the generator makes it reproducible
    a = zero_mean_init_(torch.empty(8, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    b = zero_mean_init_(torch.empty(8, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    c = zero_mean_init_(torch.empty(8, 4, 3, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std() > 0


def test_zmi_1x1_centres_across_input_channels():
    w = zero_mean_init_(torch.empty(6, 5, 1, 1))
    assert w.mean(dim=1).abs().max() < 1e-6
    torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.ones(6))


def test_zmi_rejects_bad_input():
    with pytest.raises(ValueError, match="conv weight"):
        zero_mean_init_(torch.empty(4, 4))
    with pytest.raises(ValueError, match="positive"):
        zero_mean_init_(torch.empty(4, 4, 3, 3), norm=0.0)


# ------------------------------------------------------------------ invariant 2: exact projection
@given(shape=conv_shapes, seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_projection_is_orthogonal_idempotent_and_contracting(shape, seed):
    p = _param_with_grad(shape, seed)
    g = p.grad.clone()
    project_gradients_([p])
    g1 = p.grad.clone()
    assert slice_means(g1).abs().max() < 1e-12
    assert abs(torch.sum(g1 * (g - g1)).item()) < 1e-9 * g.numel()
    assert g1.norm() <= g.norm() + 1e-12
    project_gradients_([p])
    torch.testing.assert_close(p.grad, g1, atol=1e-13, rtol=0)


def test_projection_handles_many_params_in_one_pass_and_skips_missing_grads():
    ps = [_param_with_grad(s, i) for i, s in enumerate([(4, 3, 3, 3), (8, 4, 3, 3), (2, 8, 5, 5), (3, 2, 3, 3)])]
    no_grad = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    expected = [p.grad - p.grad.mean(dim=(2, 3), keepdim=True) for p in ps]
    project_gradients_([*ps, no_grad])
    for p, e in zip(ps, expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=0)
    assert no_grad.grad is None


def test_projection_is_in_place_on_the_grad_tensor():
    p = _param_with_grad((4, 3, 3, 3), 0)
    grad_obj = p.grad
    project_gradients_([p])
    assert p.grad is grad_obj


# ------------------------------------------------------------------ invariant 3: partial, cmrr
@given(shape=conv_shapes, seed=st.integers(0, 2**16), lam=st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_partial_projection_scales_mean_keeps_deviations(shape, seed, lam):
    p = _param_with_grad(shape, seed)
    g = p.grad.clone()
    project_gradients_([p], lam=lam)
    mu, mu1 = slice_means(g), slice_means(p.grad)
    torch.testing.assert_close(mu1, (1 - lam) * mu, atol=1e-10, rtol=0)
    dev = g - mu[..., None, None]
    dev1 = p.grad - mu1[..., None, None]
    torch.testing.assert_close(dev1, dev, atol=1e-10, rtol=0)


@given(shape=conv_shapes, seed=st.integers(0, 2**16), m=st.floats(0.0, 3.0))
@settings(max_examples=40, deadline=None)
def test_cmrr_keeps_mean_and_amplifies_deviations(shape, seed, m):
    p = _param_with_grad(shape, seed)
    g = p.grad.clone()
    cmrr_gradients_([p], m=m)
    mu, mu1 = slice_means(g), slice_means(p.grad)
    torch.testing.assert_close(mu1, mu, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.grad - mu1[..., None, None], (1 + m) * (g - mu[..., None, None]), atol=1e-9, rtol=0)


@given(shape=conv_shapes, seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_filter_granularity_is_gradient_centralization(shape, seed):
    p = _param_with_grad(shape, seed)
    expected = p.grad - p.grad.mean(dim=(1, 2, 3), keepdim=True)
    project_gradients_([p], granularity="filter")
    torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=0)


def test_projection_rejects_what_it_must_not_touch():
    lin = torch.nn.Parameter(torch.randn(4, 4))
    lin.grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match="conv weights"):
        project_gradients_([lin])
    one = torch.nn.Parameter(torch.randn(4, 4, 1, 1))
    one.grad = torch.randn(4, 4, 1, 1)
    with pytest.raises(ValueError, match="1x1"):
        project_gradients_([one])
    p = _param_with_grad((2, 2, 3, 3), 0)
    with pytest.raises(ValueError, match="granularity"):
        project_gradients_([p], granularity="pixel")
    with pytest.raises(ValueError, match="lam"):
        project_gradients_([p], lam=1.5)


# ------------------------------------------------------------------ invariant 5: common-mode rejection
def test_zmi_conv_ignores_per_channel_constant_on_interior_pixels():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=False)
    zero_mean_init_(conv.weight)
    x = torch.randn(2, 5, 10, 10)
    shift = torch.randn(1, 5, 1, 1) * 10
    y, y_shift = conv(x), conv(x + shift)
    torch.testing.assert_close(y_shift[..., 1:-1, 1:-1], y[..., 1:-1, 1:-1], atol=1e-4, rtol=0)
    # a generic kernel does not reject it: the test can fail
    plain = torch.nn.Conv2d(5, 7, 3, padding=1, bias=False)
    assert (plain(x + shift) - plain(x))[..., 1:-1, 1:-1].abs().max() > 1e-2


# ------------------------------------------------------------------ invariant 6: noise
@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_noise_is_identity_in_eval(dist):
    noise = BlockInputNoise(0.3, dist).eval()
    x = torch.randn(4, 6, 5, 5)
    assert noise(x) is x


@given(delta=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_uniform_noise_multiplier_per_sample_channel(delta, seed):
    torch.manual_seed(seed)
    noise = BlockInputNoise(delta).train()
    x = torch.ones(16, 8, 6, 6)
    eps = noise(x)
    assert torch.equal(eps, eps[..., :1, :1].expand_as(eps))  # constant over H x W
    e = eps[:, :, 0, 0]
    assert e.min() >= 1 - delta - 1e-6 and e.max() <= 1 + delta + 1e-6
    assert e.std(dim=0).min() > 0 and e.std(dim=1).min() > 0  # varies per sample and per channel


def test_gaussian_noise_is_clamped():
    torch.manual_seed(0)
    e = BlockInputNoise(1.0, "gaussian").train()(torch.ones(512, 32, 1, 1))
    assert e.min() >= 0 and e.max() <= 2 and e.std() > 0.3


@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_noise_multiplier_is_drawn_in_fp32_under_bf16_autocast(dist):
    """bf16 would quantize U(0.9, 1.1) to 39 values in steps of 0.004-0.008 (and even round some
    draws to 0.8984, outside the range): the multiplier is an fp32 draw, the product is formed in
    fp32 and rounded once to the activations' dtype."""
    noise = BlockInputNoise(0.1, dist).train()
    x = torch.randn(256, 16, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        eps = noise.multiplier(x)
        torch.manual_seed(0)
        out = noise(x)
    assert eps.dtype == torch.float32 and out.dtype == torch.bfloat16
    values = eps.flatten()
    assert values.unique().numel() > 1000  # a bf16 draw has at most 39 distinct values here
    on_bf16_grid = values.to(torch.bfloat16).float() == values
    assert on_bf16_grid.float().mean() < 0.01  # not quantized: almost no value is a bf16 number
    if dist == "uniform":
        assert values.min() >= 0.9 - 1e-6 and values.max() <= 1.1 + 1e-6
    torch.testing.assert_close(out, (x.float() * eps).to(torch.bfloat16), rtol=0, atol=0)
    # fp32 activations: the same draw, the exact fp32 product (runs in fp32 are unchanged)
    torch.manual_seed(0)
    x32 = x.float()
    assert torch.equal(noise(x32), x32 * eps)


def test_gain_noise_is_drawn_in_fp32_under_bf16_autocast(monkeypatch):
    """The per-filter kernel-gain noise: the kernel the conv receives carries an fp32 draw."""
    from msr.core.models import GainConv2d

    conv = GainConv2d(4, 256, 3, padding=1, bias=False, gain_noise=0.1).train()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.log_gain.zero_()
    kernels = []
    forward = conv._conv_forward
    monkeypatch.setattr(conv, "_conv_forward", lambda x, w, b: kernels.append(w) or forward(x, w, b))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.ones(1, 4, 3, 3))
    torch.manual_seed(0)
    expected = torch.empty(256, dtype=torch.float32).uniform_(0.9, 1.1)
    kernel = kernels[0][:, 0, 0, 0]
    assert kernels[0].dtype == torch.float32 and torch.equal(kernel, expected)
    assert (kernel.to(torch.bfloat16).float() == kernel).float().mean() < 0.05


def test_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dist"):
        BlockInputNoise(0.1, "laplace")
    with pytest.raises(ValueError, match="delta"):
        BlockInputNoise(1.5)


# ------------------------------------------------------------------ unity decay
def test_unity_decay_value_and_gradient_direction():
    w = torch.nn.Parameter(zero_mean_init_(torch.empty(4, 3, 3, 3), norm=2.0))
    loss = unity_decay([w], kappa=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 4 * (2.0 - 1.0) ** 2))
    loss.backward()
    # gradient proportional to each filter: keeps zero-mean kernels zero-mean
    assert slice_means(w.grad).abs().max() < 1e-7
    cos = F.cosine_similarity(w.grad.flatten(1), w.detach().flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(4))
    assert unity_decay([torch.nn.functional.normalize(torch.randn(5, 9), dim=1)]).abs() < 1e-9
