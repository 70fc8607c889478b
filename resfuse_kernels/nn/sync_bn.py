"""Synchronised BatchNorm for reference and fused blocks alike.

A block's BatchNorm synchronises when it is an ``nn.SyncBatchNorm`` or a
:class:`CpuSyncBatchNorm`: the reference forward runs the module, the fused
forward hands its process group to the fused op (:func:`group_of`), so a
fused block and its reference twin stay twins under either.

PyTorch's SyncBatchNorm refuses CPU tensors (its statistics kernels exist for
GPUs only, and DDP rejects it on CPU modules), so off CUDA each BatchNorm2d
becomes a :class:`CpuSyncBatchNorm`: the same module (parameters, buffers,
keys) whose training forward combines the per-channel moments over the
process group with autograd-aware all-reduces, count-weighted as
nn.SyncBatchNorm's, so N ranks with batch B each compute what one process
computes with batch N*B.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SumOverRanks(torch.autograd.Function):
    """``x`` summed over the group's ranks; the gradient of each rank's copy
    is the sum of the ranks' gradients (every rank's loss depends on every
    rank's x)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of ``process_group``
    (None: the default group), nn.SyncBatchNorm's semantics on any device."""

    process_group = None  # a class attribute: modules switched to this class have it

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        group = group_of(self)
        if group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=torch.float64)
        dist.all_reduce(count, group=group)
        n = count.item()
        # Two passes (mean, then centred squares): no cancellation in the variance.
        mean = _SumOverRanks.apply(input.sum(dims), group) / n
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims), group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / self.num_batches_tracked.item() if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out


def group_of(bn: nn.Module):
    """The process group whose statistics ``bn`` uses now, or None: a
    synchronising BatchNorm in training with torch.distributed initialised
    (as nn.SyncBatchNorm decides), its ``process_group`` or the default one."""
    if not isinstance(bn, (nn.SyncBatchNorm, CpuSyncBatchNorm)) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return bn.process_group or dist.group.WORLD


def convert_sync_batchnorm(model: nn.Module, process_group=None,
                           device: Optional[torch.device] = None) -> nn.Module:
    """``model`` with every BatchNorm2d synchronised across ``process_group``
    (None: the default group), fused blocks included: nn.SyncBatchNorm on
    CUDA, :class:`CpuSyncBatchNorm` elsewhere. ``device`` defaults to that of
    the model's first parameter. Parameter, buffer and state_dict names are
    kept; the model is changed in place where it can be (returned either way).
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            # A subclass with no state of its own: switch the class, keep the module.
            m.__class__ = CpuSyncBatchNorm
            if process_group is not None:
                m.process_group = process_group
    return model
