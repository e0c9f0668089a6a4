"""CIFAR ResNet structure: depths, parameter counts, option-A shortcut (invariant 8)."""

import pytest
import torch

from msr.core.models import GainConv2d, OptionAShortcut, cifar_resnet, parse_arch


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110])
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_output_shape_every_depth(depth, norm):
    model = cifar_resnet(depth, num_classes=7, norm=norm)
    n = (depth - 2) // 6
    assert len(model.blocks) == 3 * n
    assert len(model.convs()) == depth - 1  # stem + 2 per block; the head is the last layer
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_parameter_count_matches_reference():
    # the reference CIFAR ResNet-20 (option A) has 269,722 parameters ("0.27M")
    assert sum(p.numel() for p in cifar_resnet(20).parameters()) == 269_722
    # ResNet-56: 0.85M, ResNet-110: 1.7M (He et al. 2016, Table 6)
    assert round(sum(p.numel() for p in cifar_resnet(56).parameters()) / 1e6, 2) == 0.85
    assert round(sum(p.numel() for p in cifar_resnet(110).parameters()) / 1e6, 1) == 1.7


def test_in_channels_and_small_images():
    model = cifar_resnet(8, in_channels=1, norm="none")
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("bad", [7, 9, 21, 2])
def test_invalid_depth_names_the_rule(bad):
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(bad)


def test_parse_arch():
    assert parse_arch("resnet56") == 56
    for bad in ["resnet21", "vgg16", "resnet", "ResNet20"]:
        with pytest.raises(ValueError, match="resnet"):
            parse_arch(bad)


def test_option_a_shortcut_shape_and_zero_channels():
    sc = OptionAShortcut(16, 32, stride=2)
    x = torch.randn(4, 16, 8, 8)
    y = sc(x)
    assert y.shape == (4, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0
    assert not list(sc.parameters())


def test_downsampling_block_uses_option_a():
    model = cifar_resnet(20)
    shortcuts = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2  # entering stage 2 and stage 3
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_gain_conv_equals_scaled_output():
    torch.manual_seed(0)
    conv = GainConv2d(4, 6, 3, padding=1, bias=False, gain_init=0.8)
    with torch.no_grad():
        conv.log_gain.uniform_(-1, 1)
    x = torch.randn(2, 4, 7, 7)
    ref = torch.nn.functional.conv2d(x, conv.weight, padding=1) * conv.gain.view(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-5)
    fresh = GainConv2d(4, 6, 3)
    torch.testing.assert_close(fresh.gain, torch.full((6,), 0.8))


def test_gain_noise_only_in_training():
    torch.manual_seed(0)
    conv = GainConv2d(4, 6, 3, padding=1, gain_noise=0.2)
    x = torch.randn(2, 4, 5, 5)
    conv.eval()
    assert torch.equal(conv(x), conv(x))
    conv.train()
    assert not torch.equal(conv(x), conv(x))


def test_norm_free_net_has_no_batchnorm_and_bn_net_has_one_per_conv():
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cifar_resnet(20, norm="none").modules())
    bn = cifar_resnet(20)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == len(bn.convs())
