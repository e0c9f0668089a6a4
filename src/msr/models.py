"""CIFAR ResNets of He et al. (2016), with or without BatchNorm.

Depth 6n+2, widths 16/32/64, a 3x3 stem, post-activation basic blocks, the parameter-free
option-A shortcut, global average pooling and a linear head.

Every convolution is an ``nn.Conv2d`` (or the ``GainConv2d`` subclass) whose ``.weight`` is
the raw kernel W that zero-mean init and the gradient projection act on; the per-filter gain
of the normalizer-free nets is a separate parameter, so ``W`` stays the object the method talks
about. Normalization layers are separate modules after each conv, so forward hooks on the convs
see conv outputs before any norm (what the mean-shift probe measures).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NoiseFactory = Callable[[], nn.Module]

VALID_DEPTHS_HINT = "depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"


class GainConv2d(nn.Conv2d):
    """Conv whose effective kernel is ``exp(log_gain[o]) * W[o]``.

    The gain replaces BatchNorm's scale: W keeps its direction (held near unit norm by the
    unity decay), the gain carries magnitude. Scaling the kernel (O*I*k*k numbers) is cheaper
    than scaling the output (N*O*H*W numbers) and mathematically the same.

    ``gain_noise`` > 0 multiplies every gain by U(1-s, 1+s) per filter during training (one draw
    shared by the batch): METHOD.md's kernel-gain noise option.
    """

    def __init__(self, *args, gain_init: float = 0.8, gain_noise: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_gain = nn.Parameter(torch.full((self.out_channels,), math.log(gain_init)))
        self.gain_noise = gain_noise

    @property
    def gain(self) -> torch.Tensor:
        return self.log_gain.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.gain
        if self.training and self.gain_noise > 0:
            noise = torch.empty_like(gain).uniform_(1 - self.gain_noise, 1 + self.gain_noise)
            gain = gain * noise
        return self._conv_forward(x, self.weight * gain.view(-1, 1, 1, 1), self.bias)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: stride-2 subsample, then zero channels appended after the input's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcut cannot reduce channels")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def _norm(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.Identity()


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(norm(conv(relu(norm(conv(x))))) + shortcut(x)).

    ``input_noise`` sits at the block input, so the noisy tensor feeds both branch and shortcut;
    ``conv_noise`` (optional) follows each conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        norm: str,
        conv: Callable[..., nn.Conv2d],
        input_noise: NoiseFactory | None = None,
        conv_noise: NoiseFactory | None = None,
    ):
        super().__init__()
        self.input_noise = input_noise() if input_noise else nn.Identity()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.noise1 = conv_noise() if conv_noise else nn.Identity()
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1)
        self.noise2 = conv_noise() if conv_noise else nn.Identity()
        self.norm2 = _norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_noise(x)
        out = F.relu(self.norm1(self.noise1(self.conv1(x))))
        out = self.norm2(self.noise2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images. ``stem`` and ``fc`` are named so the method can find them."""

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: str = "bn",
        widths: tuple[int, int, int] = (16, 32, 64),
        block_gains: bool = False,
        block_bias: bool = False,
        stem_bias: bool = False,
        gain_init: float = 0.8,
        gain_noise: float = 0.0,
        input_noise: NoiseFactory | None = None,
        conv_noise: NoiseFactory | None = None,
    ):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"invalid depth {depth}: {VALID_DEPTHS_HINT}")
        if block_gains and norm == "bn":
            raise ValueError("per-filter gains replace BatchNorm's scale; use them with norm='none'")
        n = (depth - 2) // 6
        self.depth = depth

        def block_conv(cin: int, cout: int, k: int, stride: int, padding: int) -> nn.Conv2d:
            if block_gains:
                return GainConv2d(
                    cin, cout, k, stride=stride, padding=padding, bias=block_bias,
                    gain_init=gain_init, gain_noise=gain_noise,
                )
            return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=block_bias)

        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=stem_bias)
        self.stem_norm = _norm(norm, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    BasicBlock(
                        cin, width, stride, norm=norm, conv=block_conv,
                        input_noise=input_noise, conv_noise=conv_noise,
                    )
                )
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)

    def residual_convs(self) -> list[nn.Conv2d]:
        """The convs inside residual blocks (everything but the stem)."""
        return [m for m in self.blocks.modules() if isinstance(m, nn.Conv2d)]

    def convs(self) -> list[nn.Conv2d]:
        """Every conv, stem first, in forward order."""
        return [self.stem, *self.residual_convs()]


def cifar_resnet(
    depth: int, *, num_classes: int = 10, in_channels: int = 3, norm: str = "bn", **kwargs
) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet. ``norm='bn'`` is the reference net; ``'none'`` drops BatchNorm.

    Initialization is left to the caller (``msr.variants`` applies each variant's scheme);
    this builds PyTorch's default-initialized module.
    """
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs)


def parse_arch(arch: str) -> int:
    """'resnet20' -> 20, with an error that names the valid form."""
    prefix = "resnet"
    if not arch.startswith(prefix) or not arch[len(prefix):].isdigit():
        raise ValueError(f"unknown arch {arch!r}: expected 'resnetN' with N = 6n+2, e.g. resnet20")
    depth = int(arch[len(prefix):])
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"unknown arch {arch!r}: {VALID_DEPTHS_HINT}")
    return depth
