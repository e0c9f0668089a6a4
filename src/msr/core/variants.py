"""The registry of named ablation variants (docs/method.md, "Variants"); adding one is one entry.

``build(name, ...)`` returns a ``Variant``: the model, initialized by the variant's scheme,
plus the three hooks a training loop needs - ``param_groups()``, ``after_backward()`` and
``extra_loss()`` - so the loop itself knows nothing about the method.

The peers (``wn``, ``fixup``, ``skipinit``, ``nf_ws`` and the control ``bn_preact``) keep the
harness's data, schedule and final-epoch protocol; only their net, init and optimizer groups
(lr, decay) are their own, each registry entry citing its source (details:
docs/method.md, "Peers").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from msr import catalog
from msr.core.method import (
    GRANULARITIES,
    NOISE_DISTS,
    BlockInputNoise,
    adaptive_clip_gradients_,
    cmrr_gradients_,
    project_gradients_,
    unity_decay,
    zero_mean_init_,
)
from msr.core.models import (
    CHANNELS,
    CLASSES,
    BasicBlock,
    FixupBlock,
    FixupResNet,
    PreActResNet,
    ResNetBase,
    apply_weight_norm_,
    check_branches_can_start,
    cifar_resnet,
    kernel_parameter,
)

# "arpit", "fixup" and "nf" are the peers' own schemes, tied to their nets (see _initialize)
INITS = ("kaiming", "unit_xavier", "zmi", "arpit", "fixup", "nf")
# "post": He et al.'s post-activation block; "skipinit": the same with a zero-initialized
# branch scalar; "fixup": Fixup's block; "preact": pre-activation (NF-ResNet when norm="none")
BLOCKS = ("post", "skipinit", "fixup", "preact")
GRAD_MODES = ("none", "project", "cmrr")
SCOPES = ("all", "residual_only")
NOISE_PLACEMENTS = ("block_input", "conv_output")


@dataclass(frozen=True)
class VariantSpec:
    """Everything that makes a variant; every field but ``name``/``description``/``claim`` can be overridden."""

    name: str
    description: str
    claim: str = ""  # the claim of docs/method.md it tests: msr.catalog.VARIANT_CLAIMS, filled in below
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
    other_lr: float = 0.1  # biases, BatchNorm parameters and the classifier (the "other" group; biases
    # and gains move to the "scalar" group when scalar_lr is set)
    weight_decay: float = 0.0  # L2, SGD-style
    unity_kappa: float = 5e-4
    zmi_norm: float = 1.0
    gain_init: float = 0.8
    block: str = "post"
    weight_norm: bool = False  # every conv and the classifier as g v / ||v|| (the `wn` peer)
    nf_alpha: float = 0.2  # NF-ResNet's per-block variance growth alpha (block="preact", norm="none")
    # a third optimizer group "scalar" - the net's gates, gains, biases and WN g (everything but
    # conv kernels, the classifier weight and log-gains) - at this lr; None: no such group
    scalar_lr: float | None = None
    scalar_decay: bool = True  # whether the "scalar" group gets the weight decay
    agc: float = 0.0  # adaptive gradient clipping factor lambda (NFNets); 0 = off
    # linear learning-rate warm-up over this fraction of the run's optimizer steps (0 = none),
    # from a conv-group lr of ``warmup_from`` up to the run's; every group follows the conv
    # group's ratio. A run whose conv lr is at most ``warmup_from`` has nothing to warm up
    # (Fixup's official rule: warm up only above 0.1). msr.training.schedule.LinearWarmup
    warmup: float = 0.0
    warmup_from: float = 0.0

    def __post_init__(self) -> None:
        if not self.claim:  # the catalog is the one home of the claim labels
            object.__setattr__(self, "claim", catalog.VARIANT_CLAIMS.get(self.name, ""))

        def one_of(field: str, valid: tuple) -> None:
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"variant {self.name!r}: {field}={value!r} is not one of {list(valid)}")

        def in_range(field: str, lo: float, hi: float = math.inf) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"variant {self.name!r}: {field}={value!r} must be a number in [{lo}, {hi}]")
            if not math.isfinite(value):  # an unbounded field (lr, weight_decay, ...) would take inf
                raise ValueError(f"variant {self.name!r}: {field}={value!r} must be a finite number")

        one_of("norm", ("bn", "none"))
        one_of("init", INITS)
        one_of("grad", GRAD_MODES)
        one_of("granularity", GRANULARITIES)
        one_of("scope", SCOPES)
        one_of("noise_dist", NOISE_DISTS)
        one_of("noise_placement", NOISE_PLACEMENTS)
        one_of("block", BLOCKS)
        for flag in ("affine", "weight_norm", "scalar_decay"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"variant {self.name!r}: {flag} must be true or false")
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
        in_range("nf_alpha", 1e-12)
        in_range("agc", 0.0)
        in_range("warmup", 0.0, 1.0)
        if self.warmup >= 1.0:
            raise ValueError(f"variant {self.name!r}: warmup={self.warmup!r} is a fraction of the run: must be < 1")
        in_range("warmup_from", 0.0)
        if self.scalar_lr is not None:
            in_range("scalar_lr", 0.0)
        self._check_peer_combination()
        if self.norm == "bn" and self.affine:
            raise ValueError(f"variant {self.name!r}: the affine gain scheme replaces BatchNorm; use affine=false with norm='bn'")
        if self.gain_noise > 0 and not (self.norm == "none" and self.affine):
            raise ValueError(f"variant {self.name!r}: gain_noise needs the per-filter gains of the affine scheme")

    def _check_peer_combination(self) -> None:
        """The peers' nets, inits and the method's options only combine where they are defined."""

        def need(ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"variant {self.name!r}: {why}")

        post = self.block in ("post", "skipinit")
        need(post or not self.affine, f"the affine gain scheme is for the post-activation net, not block={self.block!r}; set affine=false")
        need(post or self.grad == "none", f"grad={self.grad!r} needs block 'post' or 'skipinit'")
        need(post or self.noise_delta == 0, f"noise needs block 'post' or 'skipinit', not {self.block!r}")
        need((self.block == "fixup") == (self.init == "fixup"), "init='fixup' goes with block='fixup' and only with it")
        need(self.block != "fixup" or self.norm == "none", "Fixup is normalizer-free: use norm='none'")
        nf = self.block == "preact" and self.norm == "none"
        need(nf == (self.init == "nf"), "init='nf' goes with block='preact', norm='none' (NF-ResNet) and only with it")
        need(self.block != "preact" or self.norm == "none" or self.init == "kaiming", "the BatchNorm pre-activation net uses init='kaiming'")
        need(self.weight_norm == (self.init == "arpit"), "init='arpit' goes with weight_norm=true and only with it")
        if self.weight_norm:
            need(post and self.norm == "none" and not self.affine, "weight_norm needs block 'post'/'skipinit', norm='none', affine=false")
            need(self.grad == "none", "weight_norm with a gradient projection is not defined (it would act on v)")


_NF = dict(norm="none", affine=True, init="unit_xavier", lr=0.4, other_lr=0.1, weight_decay=0.0)
_BN = dict(norm="bn", affine=False, init="kaiming", lr=0.1, other_lr=0.1, weight_decay=1e-4, unity_kappa=0.0)

VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in [
        VariantSpec("bn", "BatchNorm baseline (He et al. 2016 recipe)", **_BN),
        VariantSpec("bn_noise", "bn + block-input noise", noise_delta=0.1, **_BN),
        VariantSpec(
            "plain", "no normalization, Kaiming init, biases, L2 decay",
            norm="none", affine=False, init="kaiming", lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0,
        ),
        VariantSpec("nf", "affine scheme + unity decay, unit-norm Xavier init; no ZMI/ZMG", **_NF),
        VariantSpec("zmi", "nf + zero-mean init (init only)", **{**_NF, "init": "zmi"}),
        VariantSpec("zmg", "nf + zero-mean gradient projection (projection only)", grad="project", **_NF),
        VariantSpec("msr", "nf + ZMI + ZMG", grad="project", **{**_NF, "init": "zmi"}),
        VariantSpec("msr_noise", "msr + block-input noise: the full method", grad="project", noise_delta=0.1, **{**_NF, "init": "zmi"}),
        VariantSpec("gc", "nf + filter-granularity projection (Gradient Centralization)", grad="project", granularity="filter", **_NF),
        VariantSpec(
            "msr_cmrr", "msr with the authors' shipped cmrr(0.9) update, stem not projected",
            grad="cmrr", cmrr_m=0.9, scope="residual_only", **{**_NF, "init": "zmi"},
        ),
        # the authors' code leaves the stem unprojected; docs/method.md, "The stem and colour"
        VariantSpec(
            "msr_rs", "msr with the stem not projected (scope residual_only)",
            grad="project", scope="residual_only", **{**_NF, "init": "zmi"},
        ),
        # --- peers (docs/method.md, "Peers"). Each keeps the harness's data, schedule and protocol.
        # Salimans & Kingma 2016 reparametrization (torch weight_norm) with the batch-free ResNet
        # init of Arpit et al. 2019 (victorcampos7/weightnorm-init@d57a84e): orthogonal v,
        # g = sqrt(gain fan_in/fan_out); SGD lr 0.1; L2 1e-4 on v only, none on g and biases.
        # Warm-up: their init is meant "in conjunction with learning rate warmup" (the paper's
        # abstract; their train.py ramps per step from --warmup_lr over --warmup_epochs, with a
        # quadratic ramp), values for ResNets NOT published (their issue #3): [ADAPT] linear from
        # lr 0.01 over 5 of 200 epochs, i.e. 2.5% of the run (docs/method.md, "Learning rates")
        VariantSpec(
            "wn", "weight normalization (every conv + classifier), Arpit et al. init, no batch statistics",
            norm="none", affine=False, init="arpit", weight_norm=True, lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0, scalar_lr=0.1, scalar_decay=False,
            warmup=0.025, warmup_from=0.01,
        ),
        # Fixup (Zhang et al. 2019) as hongyi-zhang/Fixup@f3fa449 cifar/: scalars (and fc.bias)
        # at lr/10, weight decay 1e-4 on everything; mixup OFF here although the official
        # trainer's default turns it on (--alpha 1.0): the harness has no mixup for any variant.
        # Warm-up as cifar/cifar_train.py@e57b6c0 adjust_learning_rate: only when the lr exceeds
        # 0.1, linear from 0.1 over the first 10 of 200 epochs (5% of the run; per step here,
        # per epoch there), every group scaled alike
        VariantSpec(
            "fixup", "Fixup: scalar biases + branch multipliers, L^-1/2 / zero init, scalars at lr/10; no mixup",
            norm="none", affine=False, init="fixup", block="fixup", lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0, scalar_lr=0.01, scalar_decay=True,
            warmup=0.05, warmup_from=0.1,
        ),
        # SkipInit (De & Smith 2020): one scalar per branch, init 0; the rest as `plain`
        # (Kaiming, biases, L2 1e-4 on all, lr 0.1); the gate trains with the biases and fc
        VariantSpec(
            "skipinit", "SkipInit: zero-initialized scalar per residual branch; otherwise plain",
            norm="none", affine=False, init="kaiming", block="skipinit", lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0,
        ),
        # NF-ResNet with Scaled WS (Brock et al. 2021a; deepmind-research nfnets@d8df415):
        # pre-activation, alpha 0.2, skip gain 0, SGD lr 0.1, wd 1e-4 on weights, none on gains
        # and biases; no stochastic depth or dropout (regularization parity with the other variants)
        VariantSpec(
            "nf_ws", "normalizer-free pre-activation ResNet with Scaled Weight Standardization",
            norm="none", affine=False, init="nf", block="preact", lr=0.1, other_lr=0.1,
            weight_decay=1e-4, unity_kappa=0.0, scalar_lr=0.1, scalar_decay=False,
        ),
        # He et al. 2016b pre-activation with BatchNorm, the reference recipe: the control that
        # keeps nf_ws's block form (docs/method.md, "Peers")
        VariantSpec("bn_preact", "pre-activation ResNet with BatchNorm (control for nf_ws's block form)", block="preact", **_BN),
    ]
}

OVERRIDABLE = tuple(f.name for f in fields(VariantSpec) if f.name not in ("name", "description", "claim"))


def get_spec(name: str, **overrides) -> VariantSpec:
    """The registered spec with ``overrides`` applied and validated; errors name the valid choices."""
    catalog.check_variant(name)  # the registry is the catalog's variants (tests/test_catalog.py)
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for variant {name!r}; valid: {', '.join(OVERRIDABLE)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


def _unit_rows_(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight /= weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))


def _initialize(model: ResNetBase, spec: VariantSpec) -> None:
    convs = model.convs()
    if spec.init in _PEER_INITS:
        _PEER_INITS[spec.init](model)
        return
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


def _init_arpit(model: ResNetBase) -> None:
    """Arpit et al. 2019's batch-free init of a weight-normalized ResNet.

    ``v`` orthogonal, ``g = sqrt(gain * fan_in / fan_out)`` per layer with gain 2 for the stem
    and each branch's first conv (a ReLU follows) and ``1/N`` for each branch's last conv (N
    blocks per stage), biases 0 (victorcampos7/weightnorm-init ``proposed_weight_norm_g_init``).
    Their classifier is a plain default-initialized ``nn.Linear``; ours keeps that function, only
    reparametrized (``g = ||v||``, as the wrapper left it). Their block has no post-add ReLU; ours
    keeps the harness's (our adaptation).
    """
    blocks = [b for b in model.blocks if isinstance(b, BasicBlock)]
    per_stage = len(blocks) // 3
    gains = {model.stem: 2.0}
    for b in blocks:
        gains[b.conv1] = 2.0
        gains[b.conv2] = 1.0 / per_stage
    with torch.no_grad():
        for conv in model.convs():
            g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
            nn.init.orthogonal_(v)
            out_ch, in_ch, kh, kw = v.shape
            fan_in, fan_out = in_ch * kh * kw, out_ch * kh * kw
            g.fill_(math.sqrt(gains[conv] * fan_in / fan_out))
            nn.init.zeros_(conv.bias)


def _init_fixup(model: FixupResNet) -> None:
    """Fixup's rule, as the official CIFAR code: each branch's first conv ~ N(0, sqrt(2 / (C_out k k))
    * L^-1/2) (L residual blocks), its last conv 0, classifier weight and bias 0; multipliers 1 and
    scalar biases 0 (set at construction); the stem keeps PyTorch's default init."""
    scale = model.num_residual_blocks**-0.5
    with torch.no_grad():
        for b in model.blocks:
            assert isinstance(b, FixupBlock)
            out_ch, _, kh, kw = b.conv1.weight.shape
            b.conv1.weight.normal_(0.0, math.sqrt(2.0 / (out_ch * kh * kw)) * scale)
            b.conv2.weight.zero_()
        model.fc.weight.zero_()
        model.fc.bias.zero_()


def _init_nf(model: PreActResNet) -> None:
    """NF-ResNet init: raw conv weights Kaiming-normal (fan-in, linear; Scaled WS makes the
    scale irrelevant), WS gains 1 and skip gains 0 (set at construction), conv biases 0;
    classifier ~ N(0, 0.01), bias 0 (DeepMind's nf_resnet.py / timm)."""
    with torch.no_grad():
        for conv in model.convs():
            nn.init.kaiming_normal_(kernel_parameter(conv), mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(conv.bias)
        model.fc.weight.normal_(0.0, 0.01)
        model.fc.bias.zero_()


_PEER_INITS = {"arpit": _init_arpit, "fixup": _init_fixup, "nf": _init_nf}


class Variant:
    """A built variant: ``model`` plus the hooks that make it this variant during training."""

    def __init__(self, spec: VariantSpec, model: ResNetBase):
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
        # AGC clips every parameter but the classifier's weight (the NFNet config's choice)
        fc_kernel = kernel_parameter(model.fc)
        self.agc_clipped = [p for p in model.parameters() if p is not fc_kernel] if spec.agc > 0 else []

    @property
    def name(self) -> str:
        return self.spec.name

    def param_groups(self, lr: float | None = None, *, factor: float | None = None) -> list[dict]:
        """Groups for ``torch.optim.SGD``: ``conv`` (conv kernels, log-gains), ``other`` (the rest)
        and, for the peers with a ``scalar_lr``, ``scalar`` (gates, gains, biases, WN's g).

        ``factor`` multiplies every group's learning rate (the variant's own lrs x factor: an lr
        sweep point that means the same for every variant). ``lr`` is the older spelling: it
        replaces the base (conv) learning rate, the first group's, and the other groups keep
        their ratio to it - the factor ``lr / spec.lr``. At most one of them.
        """
        spec = self.spec
        if lr is not None and factor is not None:
            raise ValueError("param_groups: give lr or factor, not both")
        if factor is not None:
            scale = factor
        else:
            scale = 1.0 if lr is None else lr / spec.lr if spec.lr > 0 else 0.0
        kernel_ids = {id(kernel_parameter(c)) for c in self.model.convs()}
        fc_kernel = kernel_parameter(self.model.fc)
        conv, other, scalar = [], [], []
        for pname, p in self.model.named_parameters():
            if id(p) in kernel_ids or pname.endswith("log_gain"):
                conv.append(p)
            elif spec.scalar_lr is not None and p is not fc_kernel:
                scalar.append(p)
            else:
                other.append(p)
        wd = spec.weight_decay
        groups = [
            {"name": "conv", "params": conv, "lr": spec.lr * scale, "weight_decay": wd},
            {"name": "other", "params": other, "lr": spec.other_lr * scale, "weight_decay": wd},
        ]
        if spec.scalar_lr is not None:
            groups.append({
                "name": "scalar", "params": scalar, "lr": spec.scalar_lr * scale,
                "weight_decay": wd if spec.scalar_decay else 0.0,
            })
        return groups

    def after_backward(self) -> None:
        """The variant's gradient modification, in place (no-op for variants without one).

        The projection runs first, then AGC: clipping rescales whole units, so a projected
        (zero-mean) gradient stays on the isocline, and the clip bounds the step taken.
        """
        if self.spec.grad == "project":
            project_gradients_(self.projected, granularity=self.spec.granularity, lam=self.spec.lam)
        elif self.spec.grad == "cmrr":
            cmrr_gradients_(self.projected, m=self.spec.cmrr_m, granularity=self.spec.granularity)
        if self.agc_clipped:
            adaptive_clip_gradients_(self.agc_clipped, self.spec.agc)

    def extra_loss(self) -> torch.Tensor:
        """Unity decay for the normalizer-free variants, else a zero scalar."""
        if not self.unity_decayed:
            return torch.zeros((), device=self.model.fc.weight.device)
        return unity_decay(self.unity_decayed, self.spec.unity_kappa)


def build(name: str, *, depth: int = 20, num_classes: int = CLASSES, in_channels: int = CHANNELS, **overrides) -> Variant:
    """Build variant ``name`` (see ``VARIANTS``) with its initialization, using torch's global RNG."""
    spec = get_spec(name, **overrides)
    noise = None
    if spec.noise_delta > 0:
        noise = lambda: BlockInputNoise(spec.noise_delta, spec.noise_dist)  # noqa: E731
    model: ResNetBase
    if spec.block == "fixup":
        model = FixupResNet(depth, num_classes=num_classes, in_channels=in_channels)
    elif spec.block == "preact":
        model = PreActResNet(depth, num_classes=num_classes, in_channels=in_channels, norm=spec.norm, alpha=spec.nf_alpha)
    else:
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
            gates=spec.block == "skipinit",
        )
        if spec.weight_norm:
            apply_weight_norm_(model)
    _initialize(model, spec)
    check_branches_can_start(model)
    return Variant(spec, model)
