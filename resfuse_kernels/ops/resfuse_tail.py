r"""The ResFuse tail: ``torch.ops.resfuse.resfuse_tail``.

Forward (paper eq. 5), per channel ``k``, with ``u`` the raw output of the
pair's last 3x3 convolution, ``h`` the identity (the output of the pair's
first block) and, optionally, ``x`` the pair's input with the 1x1 carry
weight ``W`` (K x C, no bias)::

    u_hat = (u - mean_u) * rstd_u            rstd = 1 / sqrt(var + eps)
    v     = W x                              (1x1 convolution)
    v_hat = (v - mean_v) * rstd_v
    z     = weight_d * u_hat + bias_d + h + weight_k * v_hat + bias_k
    y     = relu(z)

Without the carry (``x`` and ``W`` omitted) the op is BatchNorm + add +
ReLU: the tail of a basic residual block. In training the statistics are
the batch's, over N, H, W; in eval the running ones.

Backward. With ``g = dL/dy * [z > 0]`` and sums over N, H, W (``M`` values
per channel)::

    dh        = g
    dbias_d   = sum(g),  dweight_d = sum(g * u_hat)
    du        = weight_d * rstd_u * (g - dbias_d / M - u_hat * dweight_d / M)
    dbias_k   = sum(g),  dweight_k = sum(g * v_hat)
    dv        = weight_k * rstd_v * (g - dbias_k / M - v_hat * dweight_k / M)
    dx        = W^T dv                     (per pixel)
    dW        = sum over N, H, W of dv x^T

In eval the ``/ M`` terms vanish. Only the inputs and the per-channel
statistics are saved; ``u_hat``, ``v`` (for ``v_hat`` and the ReLU mask)
are recomputed in backward.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._common import check_activation, check_batch_norm, empty_output, STATS_DTYPE
from ._define import FusedOp

__all__ = ["resfuse_tail"]


def check(u, h, weight_d, bias_d, running_mean_d, running_var_d,
          x, w, weight_k, bias_k, running_mean_k, running_var_k, training, eps_d, eps_k):
    check_activation("u", u)
    check_activation("h", h, like=u)
    channels = u.shape[1]
    check_batch_norm("d", u, weight_d, bias_d, running_mean_d, running_var_d, training, eps_d)
    carry = {"x": x, "w": w, "weight_k": weight_k, "bias_k": bias_k}
    given = [name for name, t in carry.items() if t is not None]
    if not given:
        return
    if len(given) != len(carry):
        missing = sorted(set(carry) - set(given))
        raise ValueError(f"the carry needs x, w, weight_k and bias_k together; "
                         f"{', '.join(missing)} missing")
    check_activation("x", x, like=u, same_hw=True)
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point Tensor, got {getattr(w, 'dtype', type(w))}")
    if w.device != u.device:
        raise ValueError(f"w is on {w.device} but the activations are on {u.device}")
    shape_ok = w.dim() in (2, 4) and tuple(w.shape[2:]) in ((), (1, 1))
    if not shape_ok or w.shape[0] != channels or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be the 1x1 carry weight of shape ({channels}, {x.shape[1]}) "
                         f"or ({channels}, {x.shape[1]}, 1, 1), got {tuple(w.shape)}")
    check_batch_norm("k", u, weight_k, bias_k, running_mean_k, running_var_k, training, eps_k)


def signature(u: Tensor, h: Tensor,
              weight_d: Tensor, bias_d: Tensor,
              running_mean_d: Optional[Tensor], running_var_d: Optional[Tensor],
              x: Optional[Tensor], w: Optional[Tensor],
              weight_k: Optional[Tensor], bias_k: Optional[Tensor],
              running_mean_k: Optional[Tensor], running_var_k: Optional[Tensor],
              training: bool, eps_d: float, eps_k: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel's: returns ``(y, mean_d, var_d, mean_k, var_k)``,
    the output and the statistics used (batch, biased, in training; running
    in eval), in float64 (``STATS_DTYPE``); without the carry ``mean_k`` and ``var_k`` are empty. Running
    statistics are read, never written: :func:`resfuse_tail` updates them.
    The backward kernel's returns ``(du, dh, dweight_d, dbias_d, dx, dw,
    dweight_k, dbias_k)``, the last four empty without the carry."""


def fake(u, h, weight_d, bias_d, running_mean_d, running_var_d, x, *_):
    dtype = STATS_DTYPE
    carry_channels = 0 if x is None else u.shape[1]
    return (empty_output(u),
            u.new_empty(u.shape[1], dtype=dtype), u.new_empty(u.shape[1], dtype=dtype),
            u.new_empty(carry_channels, dtype=dtype), u.new_empty(carry_channels, dtype=dtype))


OP = FusedOp("resfuse_tail", signature, check, fake, bn_inputs={"d": "u", "k": ("x", "w")},
             activations=("u", "h", "x"))


def resfuse_tail(u: Tensor, h: Tensor,
                 weight_d: Tensor, bias_d: Tensor,
                 running_mean_d: Optional[Tensor], running_var_d: Optional[Tensor],
                 x: Optional[Tensor] = None, w: Optional[Tensor] = None,
                 weight_k: Optional[Tensor] = None, bias_k: Optional[Tensor] = None,
                 running_mean_k: Optional[Tensor] = None,
                 running_var_k: Optional[Tensor] = None,
                 *, training: bool = False,
                 momentum_d: float | Tensor = 0.1, momentum_k: float | Tensor = 0.1,
                 eps_d: float = 1e-5, eps_k: float = 1e-5,
                 process_group=None) -> Tensor:
    r"""Fused ``relu(BN_d(u) + h + BN_k(W x))``; without ``x``, ``relu(BN_d(u) + h)``.

    Args:
        u: raw output of the last 3x3 convolution, (N, K, H, W).
        h: the identity to add, same shape, device and dtype.
        weight_d, bias_d, running_mean_d, running_var_d: BN_d's affine
            parameters and running statistics, each of shape (K,).
        x: the carry's input, (N, C, H, W); C may differ from K.
        w: the 1x1 carry weight, (K, C) or (K, C, 1, 1), no bias.
        weight_k, bias_k, running_mean_k, running_var_k: BN_k's, shape (K,).
        training: batch statistics (True) or running statistics (False),
            as ``F.batch_norm``.
        momentum_d, momentum_k: weight of the batch statistics in the running
            update (``F.batch_norm``'s momentum; a 0-dim tensor works too).
            The running statistics are updated in place when ``training``.
            None is an error: nn.BatchNorm2d's ``momentum=None`` (the
            cumulative average) is ``1 / num_batches_tracked``, which the
            caller passes (the fused blocks do).
        eps_d, eps_k: added to the variances.
        process_group: a ``torch.distributed`` process group (e.g.
            ``dist.group.WORLD``): in training, the BatchNorm statistics are
            the group's, as ``nn.SyncBatchNorm``'s (count-weighted; a rank
            may hold any batch size, 0 included); every rank must call the op,
            forward and backward. None (the default), a group of one rank or
            eval mode: this process's statistics, no communication.

    Returns:
        y, shaped like ``u``; channels_last if ``u`` is.

    Gradients flow to ``u``, ``h``, ``x``, ``w`` and the four affine
    parameters. The math, forward and backward, is in this module's docstring.
    """
    return OP((u, h, weight_d, bias_d, running_mean_d, running_var_d,
               x, w, weight_k, bias_k, running_mean_k, running_var_k, training, eps_d, eps_k),
              {"momentum_d": momentum_d, "momentum_k": momentum_k}, process_group)
