"""Switch every fusable block of a model between its fused and reference forward."""

from __future__ import annotations

from torch import nn

from .blocks import FusableBlock
from .sync_bn import convert_sync_batchnorm


def convert(model: nn.Module, fused: bool = True, *, sync_batchnorm: bool = False,
            process_group=None) -> nn.Module:
    """Set ``fused`` on every :class:`FusableBlock` inside ``model``, in place.

    Parameters, buffers and state_dict keys do not change, so this is safe at
    any point, mid-training included. ``sync_batchnorm=True`` also makes every
    BatchNorm2d synchronised across ``process_group`` (None: the default
    group), fused blocks' included (:func:`~resfuse_kernels.nn.sync_bn.
    convert_sync_batchnorm`: nn.SyncBatchNorm for a model on CUDA, which
    replaces the modules, so use the returned model). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module (a model or block, changed in place), "
                        f"got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, FusableBlock):
            module.fused = fused
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, process_group)
    return model
