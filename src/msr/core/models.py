"""CIFAR ResNets of He et al. (2016), with or without BatchNorm.

Depth 6n+2, widths 16/32/64, a 3x3 stem, post-activation basic blocks, the parameter-free
option-A shortcut, global average pooling and a linear head.

Every convolution is an ``nn.Conv2d`` (or the ``GainConv2d`` subclass) whose ``.weight`` is
the raw kernel W that zero-mean init and the gradient projection act on; the per-filter gain
of the normalizer-free nets is a separate parameter, so ``W`` stays the object the method talks
about. Normalization layers are separate modules after each conv, so forward hooks on the convs
see conv outputs before any norm (what the mean-shift probe measures).

The peers (docs/method.md, "Peers") live here too:
- weight normalization: ``apply_weight_norm_`` reparametrizes every conv and the classifier with
  ``torch.nn.utils.parametrizations.weight_norm``; ``.weight`` then is the effective kernel
  ``g v / ||v||`` and the trained tensors are ``parametrizations.weight.original0/1`` (g, v);
- ``FixupResNet``: Fixup's scalar biases and branch multipliers (Zhang et al. 2019);
- ``BasicBlock(gate=True)``: SkipInit's zero-initialized branch scalar (De & Smith 2020);
- ``PreActResNet``: pre-activation blocks, either with BatchNorm (He et al. 2016b) or as the
  normalizer-free NF-ResNet with Scaled Weight Standardization (Brock et al. 2021a), whose
  convs carry a ``ScaledWS`` parametrization (``.weight`` is again the effective kernel).
``kernel_parameter`` names the tensor an optimizer updates for a layer's kernel in every case.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from msr import catalog

NoiseFactory = Callable[[], nn.Module]

# A net built without a dataset in mind is a CIFAR-10 net (the paper's main dataset)
CLASSES = catalog.dataset("cifar10").num_classes
CHANNELS = catalog.dataset("cifar10").channels

# The deepest CIFAR ResNet of He et al. (2016), ResNet-1202 (19.4M parameters). A deeper one is
# no part of this study, and a typo's depth (resnet600000002) would only exhaust memory.
MAX_DEPTH = 1202
VALID_DEPTHS_HINT = f"depth must be 6n+2 with n >= 1, at most {MAX_DEPTH} (8, 14, 20, 32, 44, 56, 110, ..., {MAX_DEPTH})"


class GainConv2d(nn.Conv2d):
    """Conv whose effective kernel is ``exp(log_gain[o]) * W[o]``.

    The gain replaces BatchNorm's scale: W keeps its direction (held near unit norm by the
    unity decay), the gain carries magnitude. Scaling the kernel (O*I*k*k numbers) is cheaper
    than scaling the output (N*O*H*W numbers) and mathematically the same.

    ``gain_noise`` > 0 multiplies every gain by U(1-s, 1+s) per filter during training (one draw
    shared by the batch): the kernel-gain noise option of docs/method.md.
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
            # an fp32 draw (a bf16 one would be discrete): under autocast the gains stay fp32
            # parameters, so the noisy kernel is exact; a model cast to bf16 rounds it once
            noise = torch.empty(gain.shape, device=gain.device, dtype=torch.float32).uniform_(
                1 - self.gain_noise, 1 + self.gain_noise)
            gain = (gain * noise).to(gain.dtype)
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
    ``conv_noise`` (optional) follows each conv. ``gate=True`` multiplies the branch by one
    learnable scalar initialized at 0 (SkipInit: ``relu(alpha * F(x) + shortcut(x))``).
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
        gate: bool = False,
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
        # a parameter, not a buffer, and no RNG draw: the ungated variants are unchanged
        self.gate = nn.Parameter(torch.zeros(1)) if gate else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch F(x) (times the gate, if any) of an already noise-injected input."""
        out = F.relu(self.norm1(self.noise1(self.conv1(x))))
        out = self.norm2(self.noise2(self.conv2(out)))
        return out if self.gate is None else out * self.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_noise(x)
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNetBase(nn.Module):
    """What every CIFAR ResNet here shares: ``stem`` (a conv), ``blocks`` and ``fc``, named so
    the method, the variants and the probes can find them."""

    stem: nn.Conv2d
    blocks: nn.Sequential
    fc: nn.Linear

    def residual_convs(self) -> list[nn.Conv2d]:
        """The convs inside residual blocks (everything but the stem)."""
        return [m for m in self.blocks.modules() if isinstance(m, nn.Conv2d)]

    def convs(self) -> list[nn.Conv2d]:
        """Every conv, stem first, in forward order."""
        return [self.stem, *self.residual_convs()]


def _check_depth(depth: int) -> int:
    """Blocks per stage of a ResNet-(6n+2)."""
    if not 8 <= depth <= MAX_DEPTH or (depth - 2) % 6:
        raise ValueError(f"invalid depth {depth}: {VALID_DEPTHS_HINT}")
    return (depth - 2) // 6


class CifarResNet(ResNetBase):
    """ResNet-(6n+2) for small images (He et al. 2016): post-activation basic blocks."""

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = CLASSES,
        in_channels: int = CHANNELS,
        norm: str = "bn",
        widths: tuple[int, int, int] = (16, 32, 64),
        block_gains: bool = False,
        block_bias: bool = False,
        stem_bias: bool = False,
        gain_init: float = 0.8,
        gain_noise: float = 0.0,
        input_noise: NoiseFactory | None = None,
        conv_noise: NoiseFactory | None = None,
        gates: bool = False,
    ):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        n = _check_depth(depth)
        if block_gains and norm == "bn":
            raise ValueError("per-filter gains replace BatchNorm's scale; use them with norm='none'")
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
                        input_noise=input_noise, conv_noise=conv_noise, gate=gates,
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


def cifar_resnet(
    depth: int, *, num_classes: int = CLASSES, in_channels: int = CHANNELS, norm: str = "bn", **kwargs
) -> CifarResNet:
    """He et al. 2016 CIFAR ResNet. ``norm='bn'`` is the reference net; ``'none'`` drops BatchNorm.

    Initialization is left to the caller (``msr.core.variants`` applies each variant's scheme);
    this builds PyTorch's default-initialized module.
    """
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs)


# --------------------------------------------------------------------------- peers
def kernel_parameter(layer: nn.Module) -> nn.Parameter:
    """The parameter an optimizer updates for a conv's or linear layer's kernel.

    ``.weight`` itself, or, under a parametrization, the tensor ``.weight`` is computed from:
    weight norm's direction ``v`` (``original1``; ``original0`` is ``g``), Scaled WS's
    unstandardized ``W`` (``original``).
    """
    if parametrize.is_parametrized(layer, "weight"):
        plist = layer.parametrizations.weight
        return plist.original1 if hasattr(plist, "original1") else plist.original
    return layer.weight


def apply_weight_norm_(model: ResNetBase) -> ResNetBase:
    """Weight normalization (Salimans & Kingma 2016) of every conv and the classifier, in place.

    ``w = g v / ||v||`` per output unit (torch's ``weight_norm``, ``dim=0``); ``g`` starts at
    ``||v||``, so wrapping leaves the function unchanged and the caller sets ``g`` and ``v``.
    No batch statistics are involved (no mean-only BatchNorm).
    """
    for layer in [*model.convs(), model.fc]:
        weight_norm(layer, name="weight", dim=0)
    return model


RELU_GAMMA = 1.7139588594436646
"""The gamma of the NF nets' scaled ReLU: ``Var(gamma * relu(z)) = 1`` for ``z ~ N(0, 1)``. This is
DeepMind's constant (nfnets/base.py); the closed form ``sqrt(2 / (1 - 1/pi))`` = 1.7128586 is
0.06 % smaller."""


def gamma_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) * RELU_GAMMA


class ScaledWS(nn.Module):
    """Scaled Weight Standardization (Brock et al. 2021a) as a ``weight`` parametrization.

    ``W_hat[o] = gain[o] * (W[o] - mean W[o]) / sqrt(N * var W[o])``, statistics per output
    filter over its ``N = I * kh * kw`` entries (population variance), ``N * var`` floored at
    ``eps`` (DeepMind's 1e-4) so a constant filter cannot divide by zero. Every filter of
    ``W_hat`` has mean 0 and squared norm ``gain[o]^2``: with the gamma-scaled ReLU in front, a
    conv keeps unit variance. The gain (init 1) lives here, the bias on the conv.
    """

    def __init__(self, out_channels: int, eps: float = 1e-4):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.flatten(1)
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        scale = torch.rsqrt((var * flat.shape[1]).clamp_min(self.eps)) * self.gain.unsqueeze(1)
        return (flat * scale - mean * scale).view_as(weight)


def ws_conv2d(cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """A conv with a per-channel bias whose ``.weight`` is Scaled-WS standardized."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=True)
    parametrize.register_parametrization(conv, "weight", ScaledWS(cout))
    return conv


class FixupBlock(nn.Module):
    """Fixup's basic block, as hongyi-zhang/Fixup ``cifar/models/fixup_resnet_cifar.py``.

    ``out = relu(conv1(x + b1a) + b1b)``; ``out = conv2(out + b2a) * scale + b2b``;
    ``relu(out + skip(x))``, where a transition's option-A shortcut gets ``x + b1a`` (as the
    official downsample does) and an identity skip gets ``x``. Convs have no bias; every ``b``
    and ``scale`` (the branch multiplier, init 1) is a one-element parameter.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.transition = stride != 1 or in_channels != out_channels
        self.shortcut = OptionAShortcut(in_channels, out_channels, stride) if self.transition else nn.Identity()

    @property
    def gate(self) -> nn.Parameter:
        """The branch's scalar multiplier (what the zero-init deadlock check looks at)."""
        return self.scale

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x + self.bias1a) + self.bias1b)
        return self.conv2(out + self.bias2a) * self.scale + self.bias2b

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x + self.bias1a) if self.transition else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.skip(x))


class FixupResNet(ResNetBase):
    """Fixup ResNet-(6n+2): ``relu(stem(x) + bias1)``, Fixup blocks, ``fc(pool(x) + bias2)``.

    Built with PyTorch's default init; ``msr.core.variants`` applies Fixup's rescaling and zeros
    (which need ``num_residual_blocks``, the L of the paper).
    """

    def __init__(self, depth: int, *, num_classes: int = CLASSES, in_channels: int = CHANNELS, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        n = _check_depth(depth)
        self.depth = depth
        self.num_residual_blocks = 3 * n
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bias1 = nn.Parameter(torch.zeros(1))
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(FixupBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bias2 = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x) + self.bias1)
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x + self.bias2)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b), with BatchNorm or normalizer-free.

    - ``norm='bn'``:   ``z = bn1(h)``;     ``F = conv2(relu(bn2(conv1(relu(z)))))``;   ``skip(h) + F``
    - ``norm='none'``: ``z = h * beta``;   ``F = conv2(act(conv1(act(z))))``;   ``skip(h) + alpha * skip_gain * F``
      (NF-ResNet, Brock et al. 2021a: ``act`` the gamma-scaled ReLU, Scaled-WS convs with bias,
      ``skip_gain`` a learnable scalar initialized at 0, as DeepMind's code).

    ``skip(h)`` is ``h``, or at a transition option-A of ``z``, the scaled (or normalized) but
    *unrectified* block input. Why: the official NF-ResNet feeds ``act(h) * beta`` to a 1x1 WS
    conv there, whose zero-mean filters remove the ReLU's mean; option A has no conv, and a
    rectified input would put a channel mean of ``gamma * E[relu(z)]`` = 0.68 on the skip path -
    exactly the mean shift NF (and MSR) remove. ``z`` has unit variance, which is the official
    net's reset of the expected variance after a transition. The BatchNorm block does the same
    with ``z = bn1(h)``, so ``bn_preact`` has the very block form of ``nf_ws``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, norm: str, alpha: float = 0.2, beta: float = 1.0):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        self.nf = norm == "none"
        if self.nf:
            self.conv1 = ws_conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            self.conv2 = ws_conv2d(out_channels, out_channels, 3, padding=1)
            self.skip_gain: nn.Parameter | None = nn.Parameter(torch.zeros(1))
        else:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
            self.skip_gain = None
        self.alpha, self.beta = alpha, beta
        self.transition = stride != 1 or in_channels != out_channels
        self.shortcut = OptionAShortcut(in_channels, out_channels, stride) if self.transition else nn.Identity()

    @property
    def gate(self) -> nn.Parameter | None:
        return self.skip_gain

    def pre(self, h: torch.Tensor) -> torch.Tensor:
        """``z``: the block input, normalized (BN) or scaled to unit expected variance (NF)."""
        return h * self.beta if self.nf else self.bn1(h)

    def branch(self, z: torch.Tensor) -> torch.Tensor:
        if self.nf:
            out = self.conv2(gamma_relu(self.conv1(gamma_relu(z))))
            return out * (self.alpha * self.skip_gain)
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(z)))))

    def skip(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.shortcut(z) if self.transition else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.pre(h)
        return self.skip(h, z) + self.branch(z)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.4f}" if self.nf else ""


class PreActResNet(ResNetBase):
    """Pre-activation ResNet-(6n+2): ``stem``, pre-activation blocks, ``act(final_norm(h))``,
    pool, ``fc``. ``norm='bn'``: He et al. 2016b; ``norm='none'``: NF-ResNet with Scaled WS.

    NF signal propagation: ``beta = expected_var ** -0.5`` per block; the expected variance
    (channel-averaged, for unit-variance input) starts at 1 (a Scaled-WS stem), grows by
    ``alpha ** 2`` per block and, after a transition, restarts from ``in/out`` (its skip carries
    the unit-variance ``z`` on the input's channels, zeros on the new ones). ``expected_vars``
    records it after every block.
    """

    def __init__(
        self, depth: int, *, num_classes: int = CLASSES, in_channels: int = CHANNELS, norm: str = "bn",
        alpha: float = 0.2, widths: tuple[int, int, int] = (16, 32, 64),
    ):
        super().__init__()
        if norm not in ("bn", "none"):
            raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")
        n = _check_depth(depth)
        self.depth = depth
        self.nf = norm == "none"
        if self.nf:
            self.stem = ws_conv2d(in_channels, widths[0], 3, padding=1)
        else:
            self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        self.expected_vars: list[float] = []
        expected_var = 1.0
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                beta = expected_var**-0.5 if self.nf else 1.0
                block = PreActBlock(cin, width, stride, norm=norm, alpha=alpha, beta=beta)
                if block.transition:
                    expected_var = cin / width
                expected_var += alpha**2
                self.expected_vars.append(expected_var)
                blocks.append(block)
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = nn.Identity() if self.nf else nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        h = self.final_norm(h)
        h = gamma_relu(h) if self.nf else F.relu(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@torch.no_grad()
def deadlocked_branches(model: nn.Module) -> list[str]:
    """Blocks whose residual branch can never start training.

    With ``out = gate * F(x)``, a zero gate and an F that is identically zero (its last conv's
    weight and bias zero) give ``dL/dgate = <delta, F(x)> = 0`` and ``dL/dW_last ~ gate = 0``:
    neither ever moves (docs/method.md, "Peers"). Each peer zeroes one of the two.
    """
    bad = []
    for name, block in model.named_modules():
        gate = getattr(block, "gate", None)
        last = getattr(block, "conv2", None)
        if not isinstance(gate, torch.Tensor) or last is None:
            continue
        last_zero = not last.weight.any() and (last.bias is None or not last.bias.any())
        if not gate.any() and last_zero:
            bad.append(name)
    return bad


def check_branches_can_start(model: nn.Module) -> None:
    """Raise if any residual branch has a zero gate and a zero last conv at once."""
    bad = deadlocked_branches(model)
    if bad:
        raise ValueError(
            f"zero-initialization deadlock in {', '.join(bad)}: the branch gate and its last conv "
            "are both zero, so neither can ever receive a gradient; zero only one of them"
        )


def parse_arch(arch: str) -> int:
    """'resnet20' -> 20, with an error that names the valid form."""
    prefix = "resnet"
    if not arch.startswith(prefix) or not arch[len(prefix):].isdigit():
        raise ValueError(f"unknown arch {arch!r}: expected 'resnetN' with N = 6n+2, e.g. resnet20")
    depth = int(arch[len(prefix):])
    if not 8 <= depth <= MAX_DEPTH or (depth - 2) % 6:
        raise ValueError(f"unknown arch {arch!r}: {VALID_DEPTHS_HINT}")
    return depth
