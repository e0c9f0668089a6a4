"""The registry of named ablation variants (METHOD.md's table); adding one is one entry.

``build(name, ...)`` returns a ``Variant``: the model, initialized by the variant's scheme,
plus the three hooks a training loop needs - ``param_groups()``, ``after_backward()`` and
``extra_loss()`` - so the loop itself knows nothing about the method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from msr.method import (
    GRANULARITIES,
    NOISE_DISTS,
    BlockInputNoise,
    cmrr_gradients_,
    project_gradients_,
    unity_decay,
    zero_mean_init_,
)
from msr.models import CifarResNet, cifar_resnet

INITS = ("kaiming", "unit_xavier", "zmi")
GRAD_MODES = ("none", "project", "cmrr")
SCOPES = ("all", "residual_only")
NOISE_PLACEMENTS = ("block_input", "conv_output")


@dataclass(frozen=True)
class VariantSpec:
    """Everything that makes a variant; every field but ``name``/``description``/``claim`` can be overridden."""

    name: str
    description: str
    claim: str
    norm: str = "none"  # "bn": BatchNorm after every conv; "none": normalizer-free
    affine: bool = True  # normalizer-free affine scheme: residual gains, biases on stem+fc only
    init: str = "unit_xavier"
    grad: str = "none"  # gradient modification after backward
    granularity: str = "channel"
    lam: float = 1.0
    cmrr_m: float = 0.9
    scope: str = "all"  # which spatial convs ZMG touches; "residual_only" skips the stem
    noise_delta: float = 0.0
    noise_dist: str = "uniform"
    noise_placement: str = "block_input"
    gain_noise: float = 0.0
    lr: float = 0.4  # conv weights and gains (the "conv" group)
    other_lr: float = 0.1  # biases, BatchNorm parameters and the classifier (the "other" group)
    weight_decay: float = 0.0  # L2, SGD-style
    unity_kappa: float = 5e-4
    zmi_norm: float = 1.0
    gain_init: float = 0.8

    def __post_init__(self) -> None:
        def one_of(field: str, valid: tuple) -> None:
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"variant {self.name!r}: {field}={value!r} is not one of {list(valid)}")

        def in_range(field: str, lo: float, hi: float = math.inf) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"variant {self.name!r}: {field}={value!r} must be a number in [{lo}, {hi}]")

        one_of("norm", ("bn", "none"))
        one_of("init", INITS)
        one_of("grad", GRAD_MODES)
        one_of("granularity", GRANULARITIES)
        one_of("scope", SCOPES)
        one_of("noise_dist", NOISE_DISTS)
        one_of("noise_placement", NOISE_PLACEMENTS)
        if not isinstance(self.affine, bool):
            raise ValueError(f"variant {self.name!r}: affine must be true or false")
        in_range("lam", 0.0, 1.0)
        in_range("cmrr_m", 0.0)
        in_range("noise_delta", 0.0, 1.0)
        in_range("gain_noise", 0.0, 1.0)
        in_range("lr", 0.0)
        in_range("other_lr", 0.0)
        in_range("weight_decay", 0.0)
        in_range("unity_kappa", 0.0)
        in_range("zmi_norm", 1e-12)
        in_range("gain_init", 1e-12)
        if self.norm == "bn" and self.affine:
            raise ValueError(f"variant {self.name!r}: the affine gain scheme replaces BatchNorm; use affine=false with norm='bn'")
        if self.gain_noise > 0 and not (self.norm == "none" and self.affine):
            raise ValueError(f"variant {self.name!r}: gain_noise needs the per-filter gains of the affine scheme")


_NF = dict(norm="none", affine=True, init="unit_xavier", lr=0.4, other_lr=0.1, weight_decay=0.0)
_BN = dict(norm="bn", affine=False, init="kaiming", lr=0.1, other_lr=0.1, weight_decay=1e-4, unity_kappa=0.0)

VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in [
        VariantSpec("bn", "BatchNorm baseline (He et al. 2016 recipe)", "reference", **_BN),
        VariantSpec("bn_noise", "bn + block-input noise", "4", noise_delta=0.1, **_BN),
        VariantSpec(
            "plain", "no normalization, Kaiming init, biases, L2 decay", "1",
            norm="none", affine=False, init="kaiming", lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0,
        ),
        VariantSpec("nf", "affine scheme + unity decay, unit-norm Xavier init; no ZMI/ZMG", "control", **_NF),
        VariantSpec("zmi", "nf + zero-mean init (init only)", "2", **{**_NF, "init": "zmi"}),
        VariantSpec("zmg", "nf + zero-mean gradient projection (projection only)", "2", grad="project", **_NF),
        VariantSpec("msr", "nf + ZMI + ZMG", "2, 3", grad="project", **{**_NF, "init": "zmi"}),
        VariantSpec("msr_noise", "msr + block-input noise: the full method", "4, 5", grad="project", noise_delta=0.1, **{**_NF, "init": "zmi"}),
        VariantSpec("gc", "nf + filter-granularity projection (Gradient Centralization)", "peer", grad="project", granularity="filter", **_NF),
        VariantSpec(
            "msr_cmrr", "msr with the authors' shipped cmrr(0.9) update, stem not projected", "fidelity",
            grad="cmrr", cmrr_m=0.9, scope="residual_only", **{**_NF, "init": "zmi"},
        ),
    ]
}

OVERRIDABLE = tuple(f.name for f in fields(VariantSpec) if f.name not in ("name", "description", "claim"))


def get_spec(name: str, **overrides) -> VariantSpec:
    """The registered spec with ``overrides`` applied and validated; errors name the valid choices."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for variant {name!r}; valid: {', '.join(OVERRIDABLE)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def _unit_rows_(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight /= weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))


def _initialize(model: CifarResNet, spec: VariantSpec) -> None:
    convs = model.convs()
    if spec.init == "kaiming":
        # the reference CIFAR recipe: Kaiming-normal (fan-in, ReLU gain) for convs and the head
        for module in [*convs, model.fc]:
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        return
    for conv in convs:
        if spec.init == "zmi" and conv.kernel_size != (1, 1):
            zero_mean_init_(conv.weight, norm=spec.zmi_norm)
        else:
            nn.init.xavier_normal_(conv.weight)
            _unit_rows_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    # classifier rows start at the norm the unity decay holds them to
    nn.init.xavier_normal_(model.fc.weight)
    _unit_rows_(model.fc.weight)
    nn.init.zeros_(model.fc.bias)


class Variant:
    """A built variant: ``model`` plus the hooks that make it this variant during training."""

    def __init__(self, spec: VariantSpec, model: CifarResNet):
        self.spec = spec
        self.model = model
        spatial = lambda convs: [c.weight for c in convs if c.kernel_size != (1, 1)]  # noqa: E731
        if spec.grad == "none":
            self.projected: list[nn.Parameter] = []
        elif spec.scope == "all":
            self.projected = spatial(model.convs())
        else:
            self.projected = spatial(model.residual_convs())
        if spec.norm == "none" and spec.affine and spec.unity_kappa > 0:
            self.unity_decayed = [c.weight for c in model.residual_convs()] + [model.fc.weight]
        else:
            self.unity_decayed = []

    @property
    def name(self) -> str:
        return self.spec.name

    def param_groups(self, lr: float | None = None) -> list[dict]:
        """Groups for ``torch.optim.SGD``: ``conv`` (conv weights, gains) and ``other`` (the rest).

        ``lr`` replaces the variant's base (conv) learning rate; the other group keeps its
        ratio to it.
        """
        scale = 1.0 if lr is None else lr / self.spec.lr if self.spec.lr > 0 else 0.0
        conv_ids = {id(c.weight) for c in self.model.convs()}
        conv, other = [], []
        for pname, p in self.model.named_parameters():
            (conv if id(p) in conv_ids or pname.endswith("log_gain") else other).append(p)
        wd = self.spec.weight_decay
        return [
            {"name": "conv", "params": conv, "lr": self.spec.lr * scale, "weight_decay": wd},
            {"name": "other", "params": other, "lr": self.spec.other_lr * scale, "weight_decay": wd},
        ]

    def after_backward(self) -> None:
        """The variant's gradient modification, in place (no-op for variants without one)."""
        if self.spec.grad == "project":
            project_gradients_(self.projected, granularity=self.spec.granularity, lam=self.spec.lam)
        elif self.spec.grad == "cmrr":
            cmrr_gradients_(self.projected, m=self.spec.cmrr_m, granularity=self.spec.granularity)

    def extra_loss(self) -> torch.Tensor:
        """Unity decay for the normalizer-free variants, else a zero scalar."""
        if not self.unity_decayed:
            return torch.zeros((), device=self.model.fc.weight.device)
        return unity_decay(self.unity_decayed, self.spec.unity_kappa)


def build(name: str, *, depth: int = 20, num_classes: int = 10, in_channels: int = 3, **overrides) -> Variant:
    """Build variant ``name`` (see ``VARIANTS``) with its initialization, using torch's global RNG."""
    spec = get_spec(name, **overrides)
    noise = None
    if spec.noise_delta > 0:
        noise = lambda: BlockInputNoise(spec.noise_delta, spec.noise_dist)  # noqa: E731
    model = cifar_resnet(
        depth,
        num_classes=num_classes,
        in_channels=in_channels,
        norm=spec.norm,
        block_gains=spec.norm == "none" and spec.affine,
        block_bias=spec.norm == "none" and not spec.affine,
        stem_bias=spec.norm == "none",
        gain_init=spec.gain_init,
        gain_noise=spec.gain_noise,
        input_noise=noise if spec.noise_placement == "block_input" else None,
        conv_noise=noise if spec.noise_placement == "conv_output" else None,
    )
    _initialize(model, spec)
    return Variant(spec, model)
