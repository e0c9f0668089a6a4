"""Synchronized BatchNorm for data-parallel training on CPUs (gloo), the SyncBN way.

``torch.nn.SyncBatchNorm`` normalizes with the statistics of the *global* batch, but only on
accelerators: in torch 2.14 its forward raises ``SyncBatchNorm expected input tensor to be on
GPU`` for a CPU tensor, and the kernels it calls (``torch.batch_norm_stats``,
``batch_norm_gather_stats_with_counts``, ``batch_norm_backward_reduce``/``_elemt``) have no CPU
implementation. A data-parallel ``bn`` run on CUDA (NCCL) uses torch's module;
:class:`CpuSyncBatchNorm` is the same algorithm written with plain tensor ops for CPUs, so the
gloo runs (the tests, the communication measurement) are the same computation:

- forward: each rank's per-channel (mean, biased var, count) -> ``all_gather`` (one collective,
  as torch's SyncBN does on gloo) -> the global mean and variance by the parallel-variance
  formula (Chan et al.) -> normalize; running stats updated with the global mean and the
  unbiased global variance, so they are identical on every rank;
- backward: each rank's per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` -> ``all_reduce``
  (one collective) -> the input gradient of the global batch's normalization. The weight and
  bias gradients stay local: the data-parallel gradient all-reduce averages them, as for any
  parameter.

Two collectives per BatchNorm layer per step, both latency-bound (2C+1 and 2C floats), and
neither can overlap with compute: the layer waits for them. Outside training mode, or in a
process group of one, it is exactly ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world):  # noqa: D102
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 activations: stats in fp32
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        local = torch.cat([mean, var, mean.new_full((1,), xf.numel() // c)])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world, 2C + 1)
        means, variances, counts = stats[:, :c], stats[:, c:2 * c], stats[:, 2 * c:]
        n = counts.sum()
        g_mean = (means * counts).sum(0) / n
        g_var = ((variances + (means - g_mean).square()) * counts).sum(0) / n  # biased
        invstd = torch.rsqrt(g_var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((g_var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else invstd * weight.to(xf.dtype)
        y = (xf - g_mean.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(xf, weight, g_mean, invstd)
        ctx.n, ctx.group, ctx.dims, ctx.in_dtype = n, group, dims, x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        xf, weight, mean, invstd = ctx.saved_tensors
        c, dims = xf.shape[1], ctx.dims
        shape = [1, c] + [1] * (xf.dim() - 2)
        dy = dy.to(xf.dtype)
        xmu = xf - mean.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.clone() if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dy, mean_dy_xmu = (both / ctx.n).split(c)
            scale = invstd if weight is None else invstd * weight.to(xf.dtype)
            grad_x = ((dy - mean_dy.view(shape) - xmu * (invstd.square() * mean_dy_xmu).view(shape))
                      * scale.view(shape)).to(ctx.in_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.in_dtype if weight is None else weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch across
    the process group (module docstring). Same parameters, buffers and state-dict keys as
    ``nn.BatchNorm2d``, so checkpoints load either way."""

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        group = self.process_group or dist.group.WORLD
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var,
                                            self.eps, momentum, group, world)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``module`` made synchronized: torch's ``nn.SyncBatchNorm`` on
    an accelerator, :class:`CpuSyncBatchNorm` on a CPU. Returns the (possibly new) module."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        # the same Parameter and buffer objects, not copies: the variant's parameter lists and
        # the optimizer's groups keep pointing at what trains
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, device)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
