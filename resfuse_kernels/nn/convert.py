"""Switch every fusable block of a model between its fused and reference forward."""

from __future__ import annotations

from torch import nn

from .blocks import FusableBlock


def convert(model: nn.Module, fused: bool = True) -> nn.Module:
    """Set ``fused`` on every :class:`FusableBlock` inside ``model``, in place.

    Parameters, buffers and state_dict keys do not change, so this is safe at
    any point, mid-training included. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module (a model or block, changed in place), "
                        f"got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, FusableBlock):
            module.fused = fused
    return model
