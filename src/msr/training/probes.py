"""Measurements of docs/method.md ("Measurements each run records") on a fixed probe batch.

- ``mean_shift``      per conv: mean over channels of |mean_{n,h,w} y_c| / std_{n,h,w} y_c of the
                      conv output, before any norm or nonlinearity (forward hooks on the convs);
- ``slice_mean_rms``  per spatial conv: RMS of the kernel slice means / RMS of the weight
                      (0 on the zero-mean isocline);
- ``filter_norm``     per conv and the classifier: mean filter (row) norm;
- ``gain``, ``gain_over_norm`` per gain conv: mean g_o and mean g_o / ||W[o]||;
- ``logit_rms``       RMS of the probe batch's logits;
- ``grad_norm``       global gradient norm of the last step (filled in by the trainer).

The probe runs the model in eval mode under ``no_grad`` (BatchNorm uses its running stats and
is not updated; noise is off), so probing never changes training.
"""

from __future__ import annotations

import torch
from torch import nn

from msr.core.method import slice_means
from msr.core.models import CifarResNet, GainConv2d

Row = tuple[int, str, str, float]  # step, layer, metric, value


def conv_layer_names(model: CifarResNet) -> dict[nn.Conv2d, str]:
    """Conv modules by their dotted name (``stem``, ``blocks.0.conv1``, ...), in forward order."""
    return {m: name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def mean_shift(y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over channels of |mean_c| / std_c, statistics over (N, H, W)."""
    y = y.float().transpose(0, 1).flatten(1)  # (C, N*H*W)
    std, mean = torch.std_mean(y, dim=1)
    return (mean.abs() / std.clamp_min(eps)).mean()


@torch.no_grad()
def weight_stats(model: CifarResNet) -> list[tuple[str, str, torch.Tensor]]:
    rows = []
    for conv, name in conv_layer_names(model).items():
        w = conv.weight.float()
        norms = w.flatten(1).norm(dim=1)
        rows.append((name, "filter_norm", norms.mean()))
        if conv.kernel_size != (1, 1):
            # a zero kernel (Fixup's zero-initialized last convs) has zero slice means: 0, not 0/0
            rms_w = w.square().mean().sqrt().clamp_min(torch.finfo(w.dtype).tiny)
            rows.append((name, "slice_mean_rms", slice_means(w).square().mean().sqrt() / rms_w))
        if isinstance(conv, GainConv2d):
            gain = conv.gain.float()
            rows.append((name, "gain", gain.mean()))
            rows.append((name, "gain_over_norm", (gain / norms).mean()))
    rows.append(("fc", "filter_norm", model.fc.weight.float().norm(dim=1).mean()))
    return rows


class Prober:
    """Measures a model on one fixed batch; ``__call__(step)`` returns long-format rows."""

    def __init__(self, model: CifarResNet, probe_x: torch.Tensor):
        self.model = model
        self.probe_x = probe_x
        self.names = conv_layer_names(model)

    @torch.no_grad()
    def __call__(self, step: int, grad_norm: float | None = None) -> list[Row]:
        shifts: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            shifts[self.names[module]] = mean_shift(output)

        handles = [conv.register_forward_hook(hook) for conv in self.names]
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(self.probe_x)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        named = [(layer, "mean_shift", v) for layer, v in shifts.items()]
        named += weight_stats(self.model)
        named.append(("model", "logit_rms", logits.float().square().mean().sqrt()))
        # one device->host copy for all the numbers
        values = torch.stack([v.float() for _, _, v in named]).cpu().tolist()
        rows = [(step, layer, metric, value) for (layer, metric, _), value in zip(named, values, strict=True)]
        if grad_norm is not None:
            rows.append((step, "model", "grad_norm", grad_norm))
        return rows


@torch.no_grad()
def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of all gradients (a device scalar: no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
