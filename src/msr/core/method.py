"""Mean Shift Rejection: the paper's method as pure functions over tensors and modules.

- ``zero_mean_init_``      ZMI: channel-wise zero-mean kernels with unit filter norm.
- ``project_gradients_``   ZMG: remove (a fraction of) each kernel slice's mean gradient.
- ``cmrr_gradients_``      the authors' shipped variant, ``(1+m) G - m mean(G)``.
- ``BlockInputNoise``      multiplicative noise per (sample, channel), identity in eval.
- ``unity_decay``          ``kappa * sum_o (||W[o]|| - 1)^2``, the replacement for L2 decay.
- ``adaptive_clip_gradients_``  AGC (Brock et al. 2021b), a peer's gradient clipping, any variant.

No training loop lives here (see ``msr.training.loop``); ``msr.core.variants`` wires these into variants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

GRANULARITIES = ("channel", "filter")


# --------------------------------------------------------------------------- ZMI
def zero_mean_init_(
    weight: torch.Tensor, norm: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-mean init (ZMI), in place; returns ``weight``.

    1. every element ~ U(-1, 1);
    2. subtract each k x k slice's spatial mean (for a 1x1 conv, the mean across input
       channels, since a 1x1 slice has no spatial extent);
    3. rescale every output filter to Euclidean norm ``norm``. Without this step a
       normalizer-free net explodes, so it is part of the method.
    """
    if weight.dim() != 4:
        raise ValueError(f"zero_mean_init_ expects a conv weight (O, I, kh, kw), got {tuple(weight.shape)}")
    out_ch, in_ch, kh, kw = weight.shape
    if kh * kw == 1 and in_ch == 1:
        raise ValueError("a 1x1 conv with one input channel has no zero-mean kernel except 0")
    if norm <= 0:
        raise ValueError(f"filter norm must be positive, got {norm}")
    with torch.no_grad():
        w = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
        w.uniform_(-1.0, 1.0, generator=generator)
        mean_dims = (2, 3) if kh * kw > 1 else (1,)
        w -= w.mean(dim=mean_dims, keepdim=True)
        w *= norm / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        weight.copy_(w)
    return weight


# --------------------------------------------------------------------------- ZMG
def _rows(t: torch.Tensor, granularity: str) -> torch.Tensor:
    """The tensor as rows whose mean the projection removes."""
    if t.dim() != 4:
        raise ValueError(f"gradient projection applies to conv weights (O, I, kh, kw), got {tuple(t.shape)}")
    if granularity == "channel":
        if t.shape[2] * t.shape[3] == 1:
            raise ValueError(
                "channel-granularity projection of a 1x1 kernel would zero its gradient; "
                "the method never projects 1x1 weights"
            )
        return t.reshape(t.shape[0] * t.shape[1], -1)
    if granularity == "filter":
        return t.reshape(t.shape[0], -1)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


@torch.no_grad()
def _scale_minus_mean_(params: Iterable[torch.Tensor], granularity: str, scale: float, lam: float) -> None:
    """``G <- scale * G - lam * mean(G)`` on every ``p.grad``, with few large kernels.

    Gradients whose rows have the same length (e.g. every 3x3 kernel at channel granularity)
    are concatenated into one matrix, so the whole model costs one mean, one update and one
    foreach copy per row length, not a handful of small kernels per parameter.
    """
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            continue
        rows = _rows(p.grad, granularity)
        groups[(rows.shape[1], p.grad.dtype, p.grad.device)].append(p.grad)
    for (row_len, _, _), grads in groups.items():
        flat = torch.cat([_rows(g, granularity) for g in grads])
        means = flat.mean(dim=1, keepdim=True)
        if scale != 1.0:
            flat.mul_(scale)
        flat.sub_(means, alpha=lam)
        chunks = flat.split([g.numel() // row_len for g in grads])
        torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads, strict=True)])


def project_gradients_(
    params: Iterable[torch.Tensor], *, granularity: str = "channel", lam: float = 1.0
) -> None:
    """ZMG: ``G <- G - lam * mean(G)`` on each ``p.grad``, in place.

    ``granularity='channel'``: mean over (kh, kw) of every (out, in) slice - the paper's
    projection. ``'filter'``: mean over (in, kh, kw) of every output filter - Gradient
    Centralization (Yong et al. 2020). ``lam=1`` is the exact orthogonal projection onto the
    zero-mean subspace; ``0 < lam < 1`` is the weighted, partial form. Parameters without a
    gradient are skipped. Call after ``backward()`` (and after unscaling / all-reduce) and before
    ``optimizer.step()``, so momentum and decay only ever see projected gradients.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _scale_minus_mean_(params, granularity, 1.0, lam)


def cmrr_gradients_(params: Iterable[torch.Tensor], *, m: float = 0.9, granularity: str = "channel") -> None:
    """The authors' shipped update ``G <- (1+m) G - m mean(G)``.

    Equal to ``(1+m) * [G - m/(1+m) mean(G)]``: a partial rejection plus a (1+m)x learning-rate
    gain. The slice mean of G is *kept*, so kernels do not stay zero-mean.
    """
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    _scale_minus_mean_(params, granularity, 1.0 + m, m)


def slice_means(weight: torch.Tensor) -> torch.Tensor:
    """Mean over (kh, kw) of every (out, in) slice: what ZMI zeroes and ZMG keeps at zero."""
    return weight.mean(dim=(2, 3))


# --------------------------------------------------------------------------- noise
NOISE_DISTS = ("uniform", "gaussian")


class BlockInputNoise(nn.Module):
    """Multiply by noise drawn per (sample, channel), constant over H x W; identity in eval.

    ``uniform``: U(1-delta, 1+delta). ``gaussian``: N(1, delta) clamped to [0, 2]. No batch
    statistics are used, so every sample's noise is independent of the rest of the batch.

    ``shard = (rank, world)``: in data-parallel training (msr.training.distributed) each rank
    holds rows ``rank*b .. (rank+1)*b`` of a global batch of ``world*b``; it draws the noise of
    the whole global batch from the (rank-identical) global RNG and keeps its own rows. Ranks
    thus draw different values, the RNG stays in step on every rank, and the noise equals the
    single-process run's at the global batch. ``(0, 1)``, the default, draws just the batch.

    The multiplier is drawn in fp32 whatever the activations' dtype: drawn in bf16 (autocast),
    U(0.9, 1.1) would take only 39 values, steps of 0.004 below 1 and 0.008 above - another,
    discrete distribution. The product is formed in fp32 and rounded once to the input's dtype,
    as any bf16 op rounds its result. (The authors drew it in the model's dtype, fp32 unless
    their ``-half``: docs/method.md, "Noise injection".)
    """

    def __init__(self, delta: float = 0.1, dist: str = "uniform"):
        super().__init__()
        if dist not in NOISE_DISTS:
            raise ValueError(f"noise dist must be one of {NOISE_DISTS}, got {dist!r}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"noise delta must be in [0, 1], got {delta}")
        self.delta = delta
        self.dist = dist
        self.shard = (0, 1)

    def multiplier(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh fp32 draw of the multiplier for ``x``, shaped (N, C, 1, ...): of the whole
        global batch under data parallelism, this rank's rows kept (``shard``)."""
        rank, world = self.shard
        shape = (x.shape[0] * world, x.shape[1]) + (1,) * (x.dim() - 2)
        if self.dist == "uniform":
            eps = torch.empty(shape, device=x.device, dtype=torch.float32).uniform_(1 - self.delta, 1 + self.delta)
        else:
            eps = torch.randn(shape, device=x.device, dtype=torch.float32).mul_(self.delta).add_(1).clamp_(0, 2)
        return eps[rank * x.shape[0]:(rank + 1) * x.shape[0]] if world > 1 else eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.delta == 0:
            return x
        return (x * self.multiplier(x)).to(x.dtype)  # fp32 product (type promotion), one rounding

    def extra_repr(self) -> str:
        return f"delta={self.delta}, dist={self.dist!r}"


# --------------------------------------------------------------------------- unity decay
def unity_decay(weights: Iterable[torch.Tensor], kappa: float = 5e-4) -> torch.Tensor:
    """``kappa * sum over filters/rows of (||W[o]|| - 1)^2``.

    Its gradient is proportional to each filter W[o], so it keeps zero-mean kernels zero-mean
    (unlike L2 towards 0, it does not shrink them: the gain carries the magnitude).
    """
    weights = list(weights)
    if not weights:
        raise ValueError("unity_decay needs at least one weight")
    total = sum(((w.flatten(1).norm(dim=1) - 1.0).square().sum() for w in weights), torch.zeros((), device=weights[0].device))
    return total * kappa


# --------------------------------------------------------------------------- AGC
def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """Norm per output unit, shaped to broadcast against ``t``: over all dims but the first for
    a conv/linear weight (per filter / row), over the whole tensor for a scalar or vector
    (gains, biases, gates), as DeepMind's nfnets ``unitwise_norm``."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape([1] * t.dim())
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


@torch.no_grad()
def adaptive_clip_gradients_(params: Iterable[torch.Tensor], clipping: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping, unit-wise and in place (NFNets, Brock et al. 2021b).

    For every unit i: if ``||G_i|| > clipping * max(||W_i||, eps)``, rescale ``G_i`` to exactly
    that norm; other units are left bitwise untouched. ``eps`` = 1e-3 and the 1e-6 floor on
    ``||G_i||`` are DeepMind's (nfnets/optim.py). Call after ``backward()`` (after unscaling)
    and before ``optimizer.step()``, so weight decay and momentum see clipped gradients.
    """
    if clipping <= 0:
        raise ValueError(f"AGC clipping factor must be > 0, got {clipping}")
    for p in params:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clipping
        grad_norm = unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp_min(1e-6))
        p.grad.copy_(torch.where(grad_norm > max_norm, clipped, p.grad))
