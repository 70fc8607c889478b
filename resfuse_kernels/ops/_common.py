"""Checks and conventions shared by the fused ops.

Conventions every backend follows:

* Activations (the 4-D inputs) share one floating dtype; the output has it
  too. Under autocast, mixed activation dtypes are promoted to their common
  type first (what the reference's elementwise ops would do).
* Arithmetic is in float32 (float64 for float64 inputs), whatever the
  storage dtype: :func:`compute_dtype`.
* The statistics a forward kernel returns, and its backward takes, are
  float64 for every storage dtype: :data:`STATS_DTYPE`.
* The output is channels_last when the first activation is (and is not also
  plain contiguous), contiguous otherwise: :func:`memory_format`. The fake
  (meta) implementations allocate with the same rule, so compiled graphs
  see the strides eager gives.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format of an op's output for first activation ``t``."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised output shaped like ``t`` in :func:`memory_format` order."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device,
                       memory_format=memory_format(t))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of in-kernel arithmetic for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the carry's products (``W x``, ``W^T dv``, ``dv x^T``)
    and of dv in the cpu, cuda and Triton backends, for activations of
    ``dtype``: csrc/layout.h's product_type, which says why."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def carry_forward(x: Tensor, w: Tensor) -> Tensor:
    """The 1x1 carry convolution v = W x, for w of shape (K, C) or (K, C, 1, 1)."""
    return F.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1))


def carry_backward(dv: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The carry's dx = W^T dv and dW = dv x^T (K x C), in float64 for every
    storage dtype (the kernels' :func:`product_dtype` for float32/float64):
    BatchNorm over few values amplifies their rounding."""
    dv, w2 = dv.double(), w.reshape(w.shape[0], w.shape[1]).double()
    return torch.einsum("kc,nkhw->nchw", w2, dv), torch.einsum("nkhw,nchw->kc", dv, x.double())


# The batch statistics (mean, biased var) the forward hands the backward, for
# every storage dtype: the backends form them in double, and over few values
# a BatchNorm's input gradient cancels to eps / (var + eps) of its terms, so a
# float32 variance or mean made da and dweight_k err 3-7x PyTorch's (soak
# seeds 3966488167, 2437485952: tests/soak-record.md). C values each: free.
STATS_DTYPE = torch.float64


def check_activation(name: str, t: object, like: Optional[Tensor] = None,
                     same_hw: bool = False) -> None:
    """A 4-D floating tensor; with ``like``: same device, dtype and shape.

    ``same_hw`` relaxes the shape check to batch and spatial sizes only
    (for tensors whose channel count may differ, such as the carry input).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is None:
        return
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the op's first input is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the op's first input has {like.dtype}; "
                        "cast them to one dtype (autocast promotes them for you)")
    if same_hw:
        if (t.shape[0], *t.shape[2:]) != (like.shape[0], *like.shape[2:]):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; its batch and spatial sizes "
                             f"must match the op's first input {tuple(like.shape)}")
    elif t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must match the op's first "
                         f"input {tuple(like.shape)}")


def check_channel_param(name: str, t: object, channels: int, device: torch.device,
                        dtype: Optional[torch.dtype] = None, like: str = "") -> None:
    """A 1-D floating tensor of ``channels`` values on ``device``; with
    ``dtype``, of that dtype (the dtype of BatchNorm parameter ``like``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like} has {dtype}: a BatchNorm's "
                        "weight, bias and running statistics share one dtype (as "
                        "torch.nn.functional.batch_norm requires)")


# Activation dtypes whose BatchNorm may keep float32 parameters (modules keep
# fp32 parameters under autocast), as torch.nn.functional.batch_norm allows.
_FLOAT32_PARAMS_OK = (torch.bfloat16, torch.float16)


def check_batch_norm(prefix: str, first: Tensor, weight: Tensor, bias: Tensor,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, eps: float) -> None:
    """The parameters of one BatchNorm over the channels of ``first``, checked against it.

    Their dtypes follow ``torch.nn.functional.batch_norm`` (on CPU): weight,
    bias and the running statistics share one dtype, the activations' or,
    for bfloat16/float16 activations, float32; anything else is an error
    naming the argument.
    """
    name, channels = f"weight_{prefix}", first.shape[1]
    check_channel_param(name, weight, channels, first.device)
    dtype = weight.dtype
    if dtype != first.dtype and not (dtype == torch.float32 and first.dtype in _FLOAT32_PARAMS_OK):
        allowed = (f"{first.dtype} or torch.float32" if first.dtype in _FLOAT32_PARAMS_OK
                   else f"{first.dtype}")
        raise TypeError(f"{name} has dtype {dtype} but the activations have {first.dtype}: "
                        f"BatchNorm parameters and running statistics must be {allowed} (as "
                        "torch.nn.functional.batch_norm requires); cast them, or the module")
    check_channel_param(f"bias_{prefix}", bias, channels, first.device, dtype, name)
    if training and channels and first.numel() == channels:  # one value a channel
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"of size {tuple(first.shape)} for BatchNorm {prefix!r}")
    for suffix, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            check_channel_param(f"{suffix}_{prefix}", t, channels, first.device, dtype, name)
        elif not training:
            raise ValueError(f"{suffix}_{prefix} is required in eval mode (training=False)")
    if not eps > 0:
        raise ValueError(f"eps_{prefix} must be positive, got {eps}")


def check_momenta(**momenta: object) -> None:
    """Each momentum is a number or a 0-dim floating tensor.

    Called by the public entry points only when a momentum is not a float
    (the common case costs them one isinstance check). ``momentum=None``
    is rejected: nn.BatchNorm2d's None is the cumulative average
    ``1 / num_batches_tracked``, and the op has no batch count.
    """
    for name, m in momenta.items():
        if isinstance(m, numbers.Real) and not isinstance(m, bool):  # numpy's too
            continue
        if isinstance(m, Tensor) and m.dim() == 0 and m.is_floating_point():
            continue
        if m is None:
            raise ValueError(
                f"{name}=None is not supported by the op: nn.BatchNorm2d's momentum=None "
                "means the cumulative average 1 / num_batches_tracked, and the op does not "
                f"know the batch count. Pass {name}=1 / num_batches_tracked (a float or a "
                "0-dim tensor, after counting this batch), or use the fused blocks "
                "(rk.nn.*), which do that bookkeeping")
        got = (f"a {m.dim()}-D {m.dtype} tensor" if isinstance(m, Tensor)
               else f"{type(m).__name__} {m!r}")
        raise TypeError(f"{name} must be a float (the weight of the batch statistics in the "
                        f"running update, as F.batch_norm's momentum) or a 0-dim floating "
                        f"tensor, got {got}")


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for ``device_type``; False for device types
    autocast does not know, such as 'meta' (where torch raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def promote_under_autocast(tensors: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """Cast floating activations to their common dtype when autocast is on.

    Outside autocast the tensors are returned as they are, and a dtype
    mismatch is left for the checks to report.
    """
    present = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not present or not _autocast_enabled(present[0].device.type):
        return list(tensors)
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in tensors]


def no_autocast(t: Tensor):
    """A context in which autocast is off for ``t``'s device.

    Backends run inside it: their internal products (the carry's 1x1
    convolution) must stay in the precision the op chose, not autocast's.
    A no-op context when autocast is off (building an autocast context costs
    microseconds of host time per call).
    """
    if not _autocast_enabled(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)
