"""Checks and conventions shared by the fused ops.

Conventions every backend follows:

* Activations (the 4-D inputs) share one floating dtype; the output has it
  too. Under autocast, mixed activation dtypes are promoted to their common
  type first (what the reference's elementwise ops would do).
* Arithmetic and statistics are in float32 (float64 for float64 inputs),
  whatever the storage dtype: :func:`stat_dtype`.
* The output is channels_last when the first activation is (and is not also
  plain contiguous), contiguous otherwise: :func:`memory_format`. The fake
  (meta) implementations allocate with the same rule, so compiled graphs
  see the strides eager gives.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import backends


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format of an op's output for first activation ``t``."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised output shaped like ``t`` in :func:`memory_format` order."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device,
                       memory_format=memory_format(t))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def check_batch_norm(prefix: str, first: Tensor, channels: int, weight: Tensor, bias: Tensor,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, eps: float) -> None:
    """The parameters of one BatchNorm, checked against activation ``first``.

    Their dtypes follow ``torch.nn.functional.batch_norm`` (on CPU): weight,
    bias and the running statistics share one dtype, the activations' or,
    for bfloat16/float16 activations, float32; anything else is an error
    naming the argument.
    """
    name = f"weight_{prefix}"
    check_channel_param(name, weight, channels, first.device)
    dtype = weight.dtype
    if dtype != first.dtype and not (dtype == torch.float32 and first.dtype in _FLOAT32_PARAMS_OK):
        allowed = (f"{first.dtype} or torch.float32" if first.dtype in _FLOAT32_PARAMS_OK
                   else f"{first.dtype}")
        raise TypeError(f"{name} has dtype {dtype} but the activations have {first.dtype}: "
                        f"BatchNorm parameters and running statistics must be {allowed} (as "
                        "torch.nn.functional.batch_norm requires); cast them, or the module")
    check_channel_param(f"bias_{prefix}", bias, channels, first.device, dtype, name)
    if training:
        values = first.numel() // channels if channels else 0
        if values == 1:
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


try:  # torch >= 2.6
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - older torch: wrap_triton launches directly
    _set_wrap_triton_enabled = None


def direct_launches():
    """A context in which ``torch.library.wrap_triton`` kernels launch
    directly. The ops' implementations only ever see real tensors, but
    outside a ``triton_op`` wrap_triton defaults to dispatching every launch
    through its higher-order op, tens of microseconds of Python each; a
    ``triton_op`` switches it off the same way for its own eager calls."""
    if _set_wrap_triton_enabled is None:
        return contextlib.nullcontext()
    return _set_wrap_triton_enabled(False)


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


def update_running_stats(count: int, *updates: tuple) -> None:
    """Fold one batch's statistics into the running ones, as nn.BatchNorm2d does.

    Each update is ``(running_mean, running_var, mean, var, momentum)``:
    ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased variance ``var * count / (count - 1)``; ``var`` is the biased
    batch variance the ops return. An empty batch, or a BatchNorm without
    running statistics, leaves them unchanged. Updates with the same float
    momentum go in one ``torch._foreach_lerp_`` (one launch on a GPU).
    """
    if count == 0:
        return
    factor = count / max(count - 1, 1)  # training rejects count 1 before this
    grouped: dict[float, tuple[list, list]] = {}
    with torch.no_grad():
        for running_mean, running_var, mean, var, momentum in updates:
            if running_mean is None or running_var is None:
                continue
            batch = (mean.to(running_mean.dtype), (var * factor).to(running_var.dtype))
            if isinstance(momentum, Tensor):  # momentum=None: a cumulative average
                momentum = momentum.to(running_mean.dtype)
                running_mean.lerp_(batch[0], momentum)
                running_var.lerp_(batch[1], momentum)
                continue
            selves, others = grouped.setdefault(float(momentum), ([], []))
            selves += [running_mean, running_var]
            others += batch
        for momentum, (selves, others) in grouped.items():
            torch._foreach_lerp_(selves, others, momentum)


def eager_function(name: str, forward_impl: Callable, setup_context: Callable,
                   backward: Callable) -> Callable:
    """``apply`` of an autograd.Function running ``forward_impl`` and
    ``backward`` (the op's own autograd formula, calling its backward
    implementation directly).

    The public entry points use it outside torch.compile: it computes what
    the registered op computes, with the same checks, kernels, saved tensors
    and gradients, but skips the Python dispatch of ``torch.library``
    custom ops (argument binding, redispatch, fake-mode checks): about
    100 us a call on a slow CPU, as much as a fused kernel's whole run at
    the stage shapes of ResFuse-19 on an H200.
    """
    def forward(ctx, *args):
        # setup_context is called here, not declared: Function.apply binds a
        # declared one's arguments through inspect.signature on every call.
        out = forward_impl(*args)
        setup_context(ctx, args, out)
        return out

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                 "backward": staticmethod(backward)})
    return fn.apply


def _eager(first) -> bool:
    """Whether a public entry point runs eagerly on ``first``: a plain tensor
    (not a fake, functional or other subclass tensor) outside torch.compile's
    tracing."""
    return type(first) is Tensor and not torch.compiler.is_compiling()


# RESFUSE_CPP_AUTOGRAD=0: the compiled backends take the Python path too
# (comparisons, debugging: both give the same bits).
CPP_AUTOGRAD = os.environ.get("RESFUSE_CPP_AUTOGRAD", "1") != "0"


def fused_autograd(name: str, first, *momenta) -> Optional[Callable]:
    """The backend's ``<name>_autograd`` op, where the public entry point
    ``name`` may take it, else None.

    The compiled backends (cpu, cuda) have one: the forward kernel, the
    running-statistics update and the autograd node in C++ in one
    dispatcher call, the backward kernel called from that node
    (csrc/autograd.h), where this module's Python path would spend ~250 us
    of host time per forward + backward. It computes what the Python path
    computes. Taken on the eager path (:func:`_eager`) with float momenta
    (a tensor momentum, ``momentum=None``'s cumulative average, takes the
    Python path); the caller runs the argument checks first.
    """
    if not (CPP_AUTOGRAD and _eager(first)
            and all(isinstance(m, (float, int)) for m in momenta)):
        return None
    try:
        module = backends.kernels(first.device)
    except backends.BackendUnavailable:
        return None  # the Python path raises it, after the checks
    return getattr(module, f"{name}_autograd", None)


def select_op(name: str, first, eager_apply: Callable, opaque_op: Callable) -> Callable:
    """What public entry point ``name`` calls, for first activation ``first``.

    ``eager_apply`` (:func:`eager_function`) on the eager path (:func:`_eager`);
    under tracing the op's ``triton_op`` twin where the compiled Triton
    backend runs (:func:`~resfuse_kernels.backends.traceable_op`), else
    ``opaque_op``, the registered ``resfuse::`` op. Meta tensors take
    ``opaque_op`` too: its fake implementation infers the outputs' shapes,
    dtypes and strides, whatever backend is chosen.
    """
    if _eager(first) and not first.is_meta:
        return eager_apply
    twin = backends.traceable_op(name, first.device.type) if isinstance(first, Tensor) else None
    return twin or opaque_op
