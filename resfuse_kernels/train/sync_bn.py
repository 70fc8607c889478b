"""``--sync-bn``: synchronised BatchNorm across the ranks, for reference and
fused blocks alike (:mod:`resfuse_kernels.nn.sync_bn`)."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm

__all__ = ["CpuSyncBatchNorm", "convert"]


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm synchronised across the default process
    group (nn.SyncBatchNorm on CUDA, :class:`CpuSyncBatchNorm` elsewhere);
    fused blocks pass the group to the fused ops. Names are kept."""
    return convert_sync_batchnorm(model, device=device)
