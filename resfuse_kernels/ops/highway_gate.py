r"""The highway gate: ``torch.ops.resfuse.highway_gate``.

Forward (paper eq. 3), per channel ``c``, with ``a`` and ``b`` the raw
outputs of the block's two 3x3 convolutions and ``x`` the block input::

    a_hat = (a - mean_a) * rstd_a          rstd = 1 / sqrt(var + eps)
    b_hat = (b - mean_b) * rstd_b
    H = relu(weight_h * a_hat + bias_h)
    T = sigmoid(weight_t * b_hat + bias_t)
    y = H * T + x * (1 - T)

In training the mean and (biased) variance are the batch's, over N, H, W;
in eval they are the running statistics. ``bias_t`` is the gate bias.

Backward. With ``g = dL/dy`` and sums over N, H, W (``M`` values per
channel)::

    dx      = g * (1 - T)
    g_h     = g * T * [H > 0]                 dL/d(pre-relu)
    g_t     = g * (H - x) * T * (1 - T)       dL/d(pre-sigmoid)
    dbias_h = sum(g_h),  dweight_h = sum(g_h * a_hat)     (same for _t, b_hat)
    da      = weight_h * rstd_a * (g_h - dbias_h / M - a_hat * dweight_h / M)
    db      = weight_t * rstd_b * (g_t - dbias_t / M - b_hat * dweight_t / M)

The two ``/ M`` terms are the gradient through the batch statistics; in eval
they vanish and ``da = weight_h * rstd_a * g_h``. Nothing but the inputs and
the four per-channel statistics is saved: ``H``, ``T``, ``a_hat`` and
``b_hat`` are recomputed in backward.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._common import check_activation, check_batch_norm, empty_output, STATS_DTYPE
from ._define import FusedOp

__all__ = ["highway_gate"]


def check(a, b, x, weight_h, bias_h, running_mean_h, running_var_h,
          weight_t, bias_t, running_mean_t, running_var_t, training, eps_h, eps_t) -> None:
    check_activation("a", a)
    check_activation("b", b, like=a)
    check_activation("x", x, like=a)
    check_batch_norm("h", a, weight_h, bias_h, running_mean_h, running_var_h, training, eps_h)
    check_batch_norm("t", a, weight_t, bias_t, running_mean_t, running_var_t, training, eps_t)


def signature(a: Tensor, b: Tensor, x: Tensor,
              weight_h: Tensor, bias_h: Tensor,
              running_mean_h: Optional[Tensor], running_var_h: Optional[Tensor],
              weight_t: Tensor, bias_t: Tensor,
              running_mean_t: Optional[Tensor], running_var_t: Optional[Tensor],
              training: bool, eps_h: float, eps_t: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel's: returns ``(y, mean_h, var_h, mean_t, var_t)``,
    the output and the statistics used (the batch's biased ones in training,
    the running ones in eval), in float64 (``STATS_DTYPE``). Running statistics are read, never written:
    :func:`highway_gate` updates them. The backward kernel's returns
    ``(da, db, dx, dweight_h, dbias_h, dweight_t, dbias_t)``."""


def fake(a, b, x, *_):
    stats = [a.new_empty(a.shape[1], dtype=STATS_DTYPE) for _ in range(4)]
    return (empty_output(a), *stats)


OP = FusedOp("highway_gate", signature, check, fake, bn_inputs={"h": "a", "t": "b"},
             activations=("a", "b", "x"))


def highway_gate(a: Tensor, b: Tensor, x: Tensor,
                 weight_h: Tensor, bias_h: Tensor,
                 running_mean_h: Optional[Tensor], running_var_h: Optional[Tensor],
                 weight_t: Tensor, bias_t: Tensor,
                 running_mean_t: Optional[Tensor], running_var_t: Optional[Tensor],
                 *, training: bool = False,
                 momentum_h: float | Tensor = 0.1, momentum_t: float | Tensor = 0.1,
                 eps_h: float = 1e-5, eps_t: float = 1e-5,
                 process_group=None) -> Tensor:
    r"""Fused ``relu(BN_h(a)) * T + x * (1 - T)`` with ``T = sigmoid(BN_t(b))``.

    Args:
        a, b: raw outputs of the H and T convolutions, (N, C, H, W).
        x: the block input, same shape, device and dtype.
        weight_h, bias_h, running_mean_h, running_var_h: BN_h's affine
            parameters and running statistics, each of shape (C,).
        weight_t, bias_t, running_mean_t, running_var_t: likewise for BN_t;
            ``bias_t`` is the gate bias.
        training, momentum_h, momentum_t, eps_h, eps_t, process_group: as
            :func:`resfuse_kernels.ops.resfuse_tail`'s, for BN_h and BN_t.

    Returns:
        y, shaped like ``a``; channels_last if ``a`` is.

    Gradients flow to ``a``, ``b``, ``x`` and the four affine parameters.
    The math, forward and backward, is in this module's docstring.
    """
    return OP((a, b, x, weight_h, bias_h, running_mean_h, running_var_h,
               weight_t, bias_t, running_mean_t, running_var_t, training, eps_h, eps_t),
              {"momentum_h": momentum_h, "momentum_t": momentum_t}, process_group)
