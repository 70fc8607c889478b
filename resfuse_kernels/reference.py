"""The reference formulas (DESIGN.md section 1), in plain PyTorch.

They run the reference (``fused=False``) modules and are the oracle of every
test and benchmark: the fused ops must compute what these compute, gradients
and running statistics included. They take the BatchNorm *modules*, so
training/eval mode and the running-statistics bookkeeping are exactly
``nn.BatchNorm2d``'s.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def highway_gate(a: Tensor, b: Tensor, x: Tensor,
                 bn_h: nn.BatchNorm2d, bn_t: nn.BatchNorm2d) -> Tensor:
    """``H * T + x * (1 - T)`` with ``H = relu(bn_h(a))``, ``T = sigmoid(bn_t(b))``."""
    gate_h = F.relu(bn_h(a))
    gate_t = torch.sigmoid(bn_t(b))
    return gate_h * gate_t + x * (1 - gate_t)


def resfuse_tail(u: Tensor, h: Tensor, bn_d: nn.BatchNorm2d,
                 x: Optional[Tensor] = None, carry: Optional[nn.Conv2d] = None,
                 bn_k: Optional[nn.BatchNorm2d] = None) -> Tensor:
    """``relu(bn_d(u) + h + bn_k(carry(x)))``; without the carry, ``relu(bn_d(u) + h)``."""
    z = bn_d(u) + h
    if x is not None:
        assert carry is not None and bn_k is not None, "the carry needs carry and bn_k"
        z = z + bn_k(carry(x))
    return F.relu(z)
