"""``--sync-bn``: synchronised BatchNorm for the reference blocks.

On CUDA this is ``nn.SyncBatchNorm``. PyTorch's SyncBatchNorm refuses CPU
tensors (its statistics kernels exist for GPUs only, and DDP rejects it on
CPU modules), so on the CPU each BatchNorm2d becomes a
:class:`CpuSyncBatchNorm`: the same module (parameters, buffers, keys) whose
training forward combines the per-channel moments over the process group
with autograd-aware all-reduces, count-weighted as nn.SyncBatchNorm's, so N
ranks with batch B each compute what one process computes with batch N*B.

The fused blocks pass their BatchNorms' parameters to the fused ops, which
compute statistics per process: converting them would be a silent no-op, so
:func:`convert` refuses them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn.blocks import FusableBlock


class _SumOverRanks(torch.autograd.Function):
    """``x`` summed over the ranks; the gradient of each rank's copy is the sum
    of the ranks' gradients (every rank's loss depends on every rank's x)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole default
    process group (nn.SyncBatchNorm's semantics, on any device)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Module's name
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=torch.float64)
        dist.all_reduce(count)
        n = count.item()
        # Two passes (mean, then centred squares): no cancellation in the variance.
        mean = _SumOverRanks.apply(input.sum(dims)) / n
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / n
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


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm synchronised across the default process
    group (nn.SyncBatchNorm; :class:`CpuSyncBatchNorm` off CUDA). Parameter,
    buffer and state_dict names are kept."""
    fused = [name for name, m in model.named_modules()
             if isinstance(m, FusableBlock) and m.fused]
    if fused:
        raise ValueError(f"synchronised BatchNorm with fused blocks ({fused[0]} and "
                         f"{len(fused) - 1} more) is not supported yet: the fused ops do not "
                         f"synchronise their statistics; use the reference blocks")
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            # A subclass with no state of its own: switch the class, keep the module.
            m.__class__ = CpuSyncBatchNorm
    return model
