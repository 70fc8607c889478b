"""The residual tail of other people's blocks, ``relu(bn(u) + h)``, as one fused op.

:func:`bn_add_relu` is what :func:`resfuse_kernels.convert` puts in place of a
block's ``bn -> add -> relu``: it computes exactly what the BatchNorm2d
module, the add and the ReLU compute (running statistics, ``momentum=None``,
``num_batches_tracked``, ``affine=False``, ``bias=False`` and
``track_running_stats=False`` included) through
:func:`resfuse_kernels.ops.resfuse_tail` without its carry. Anything the op
does not take at run time (a non-4-D input, a residual of another shape or
dtype, a BatchNorm changed since conversion) runs the original modules'
computation instead, so a converted model is never wrong, only unfused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .. import ops
from .blocks import batch_norm_args

__all__ = ["bn_add_relu", "unsupported_reason"]


def unsupported_reason(bn: nn.Module) -> Optional[str]:
    """Why the fused tail cannot stand in for BatchNorm ``bn``; None if it can."""
    name = type(bn).__name__
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        return f"{name} is not initialised yet (run one batch, then convert)"
    if isinstance(bn, nn.SyncBatchNorm):
        return "SyncBatchNorm (synchronised statistics across processes) is not fused by convert"
    if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm3d)):
        rank = "2-D or 3-D" if isinstance(bn, nn.BatchNorm1d) else "5-D"
        return f"{name} normalises {rank} input; the fused op takes 4-D (N, C, H, W) input"
    if not isinstance(bn, nn.BatchNorm2d):
        kind = "a _BatchNorm" if isinstance(bn, _BatchNorm) else "not an nn.BatchNorm2d"
        return f"{name} is {kind}, whose forward the fused op does not know"
    if type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{name} overrides BatchNorm2d.forward; the fused op computes BatchNorm2d's"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return f"{name} has forward hooks, which the fused op would bypass"
    return None


def bn_add_relu(bn: nn.BatchNorm2d, u: Tensor, h: Optional[Tensor] = None) -> Tensor:
    """``relu(bn(u) + h)``, or ``relu(bn(u))`` without ``h``, fused where the op takes it."""
    fusable = (u.dim() == 4 and u.is_floating_point()
               and (h is None or (isinstance(h, Tensor) and h.shape == u.shape
                                  and h.dtype == u.dtype and h.device == u.device))
               and unsupported_reason(bn) is None)
    if not fusable:
        z = bn(u)
        return F.relu(z if h is None else z + h)
    if h is None:  # bn -> relu: the op's residual is required, so it is a zero one
        h = torch.zeros_like(u)
    d = batch_norm_args(bn, u)
    return ops.resfuse_tail(u, h, d["weight"], d["bias"], d["running_mean"], d["running_var"],
                            training=d["training"], momentum_d=d["momentum"], eps_d=d["eps"])
