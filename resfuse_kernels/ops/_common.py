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


def check_channel_param(name: str, t: object, channels: int, device: torch.device) -> None:
    """A 1-D floating tensor of ``channels`` values on ``device``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")


def check_batch_norm(prefix: str, first: Tensor, channels: int, weight: Tensor, bias: Tensor,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, eps: float) -> None:
    """The parameters of one BatchNorm, checked against activation ``first``."""
    for suffix, t in (("weight", weight), ("bias", bias)):
        check_channel_param(f"{suffix}_{prefix}", t, channels, first.device)
    if training:
        values = first.numel() // channels if channels else 0
        if values == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"of size {tuple(first.shape)} for BatchNorm {prefix!r}")
    for suffix, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            check_channel_param(f"{suffix}_{prefix}", t, channels, first.device)
        elif not training:
            raise ValueError(f"{suffix}_{prefix} is required in eval mode (training=False)")
    if not eps > 0:
        raise ValueError(f"eps_{prefix} must be positive, got {eps}")


def promote_under_autocast(tensors: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """Cast floating activations to their common dtype when autocast is on.

    Outside autocast the tensors are returned as they are, and a dtype
    mismatch is left for the checks to report.
    """
    present = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not present or not torch.is_autocast_enabled(present[0].device.type):
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
    if not torch.is_autocast_enabled(t.device.type):
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
    ``opaque_op``, the registered ``resfuse::`` op.
    """
    if _eager(first):
        return eager_apply
    twin = backends.traceable_op(name, first.device.type) if isinstance(first, Tensor) else None
    return twin or opaque_op
