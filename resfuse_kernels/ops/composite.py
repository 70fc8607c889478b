"""The ``torch`` backend: each fused op written as a composite of PyTorch ops.

This is the formula of the op docstrings made executable, forward and the
hand-derived backward, computed in float32 (float64 for float64 inputs),
with the batch statistics (handed to the backward unrounded), the
backward's per-channel sums and the carry's backward products in float64.
It runs wherever PyTorch does and is what every faster backend must match.
It is not fast: it makes one pass over memory per PyTorch op.

Function signatures are the backend interface (see
:mod:`resfuse_kernels.backends`); argument checking is done before a backend
is called.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import STATS_DTYPE, carry_backward, carry_forward, compute_dtype, memory_format

_DIMS = (0, 2, 3)  # the reduction dimensions of a per-channel statistic


def _c(t: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def _stats(z: Tensor, training: bool, running_mean: Optional[Tensor],
           running_var: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of the batch in training, copies of the running ones
    in eval, in STATS_DTYPE: in float64 from z, unrounded (PyTorch's CPU
    BatchNorm accumulates in double too)."""
    if not training:
        assert running_mean is not None and running_var is not None
        return running_mean.to(STATS_DTYPE, copy=True), running_var.to(STATS_DTYPE, copy=True)
    if z.numel() == 0:
        zeros = z.new_zeros(z.shape[1], dtype=STATS_DTYPE)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(z.to(STATS_DTYPE), dim=_DIMS, correction=0)
    return mean, var


def _bn(z: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor, bias: Tensor) -> Tensor:
    """BatchNorm of z in z's dtype, with the statistics rounded to it: the
    forward's, which the backward recomputes bit for bit."""
    z_hat = (z - _c(mean.to(z.dtype))) * _c(torch.rsqrt(var.to(z.dtype) + eps))
    return z_hat * _c(weight.to(z.dtype)) + _c(bias.to(z.dtype))


def _bn_backward(g: Tensor, z: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor,
                 training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of BN's input, weight and bias given g = dL/dBN(z), for the
    forward's (float64) statistics ``mean`` and ``var``.

    training: dz = weight * rstd * (g - mean(g) - z_hat * mean(g * z_hat));
    eval:     dz = weight * rstd * g.

    Taken, as the cpu backend takes it, as k1 g + k2 (z - mean) + k3 with the
    per-channel coefficients in float64 (from rstd of the unrounded variance:
    over few values dz cancels to eps / (var + eps) of its terms) and z - mean
    in z's dtype, and sum(g * z_hat) as rstd * sum(g (z - mean)) with the
    differences (about the float64 mean), products and sum in float64, as
    PyTorch's CPU BatchNorm takes it: where the sum cancels (BatchNorm over
    few values) float32 products made dweight err 5x PyTorch's in a trained
    block, and about a mean rounded to float32 dweight_k erred 3.3x PyTorch's
    at a mean far from the spread (x's mean 300).
    """
    dbias = g.sum(_DIMS, dtype=torch.float64)
    r = torch.rsqrt(var.double() + eps)
    wr = weight.double() * r
    dweight = (g.double() * (z.double() - _c(mean.double()))).sum(_DIMS) * r
    if not training:
        return g * _c(wr.to(g.dtype)), dweight.to(g.dtype), dbias.to(g.dtype)
    count = max(g.numel() // max(g.shape[1], 1), 1)
    k2, k3 = -wr * r * dweight / count, -wr * dbias / count
    dz = torch.addcmul(_c(k3.to(g.dtype)) + g * _c(wr.to(g.dtype)), z - _c(mean.to(z.dtype)),
                       _c(k2.to(g.dtype)))
    return dz, dweight.to(g.dtype), dbias.to(g.dtype)


def _out(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.dtype).contiguous(memory_format=memory_format(like))


# --------------------------------------------------------------------------
# highway gate

def highway_gate_forward(a, b, x, weight_h, bias_h, running_mean_h, running_var_h,
                         weight_t, bias_t, running_mean_t, running_var_t,
                         training: bool, eps_h: float, eps_t: float):
    ct = compute_dtype(a.dtype)
    a_, b_, x_ = a.to(ct), b.to(ct), x.to(ct)
    mean_h, var_h = _stats(a_, training, running_mean_h, running_var_h)
    mean_t, var_t = _stats(b_, training, running_mean_t, running_var_t)
    gate_h = torch.relu(_bn(a_, mean_h, var_h, eps_h, weight_h, bias_h))
    gate_t = torch.sigmoid(_bn(b_, mean_t, var_t, eps_t, weight_t, bias_t))
    y = gate_h * gate_t + x_ * (1 - gate_t)
    return _out(y, a), mean_h, var_h, mean_t, var_t


def highway_gate_backward(grad_y, a, b, x, weight_h, bias_h, mean_h, var_h,
                          weight_t, bias_t, mean_t, var_t,
                          training: bool, eps_h: float, eps_t: float):
    ct = compute_dtype(a.dtype)
    g, a_, b_, x_ = grad_y.to(ct), a.to(ct), b.to(ct), x.to(ct)
    gate_h = torch.relu(_bn(a_, mean_h, var_h, eps_h, weight_h, bias_h))
    gate_t = torch.sigmoid(_bn(b_, mean_t, var_t, eps_t, weight_t, bias_t))
    dx = g * (1 - gate_t)
    g_h = g * gate_t * (gate_h > 0)
    g_t = g * (gate_h - x_) * gate_t * (1 - gate_t)
    da, dweight_h, dbias_h = _bn_backward(g_h, a_, mean_h, var_h, eps_h, weight_h.to(ct), training)
    db, dweight_t, dbias_t = _bn_backward(g_t, b_, mean_t, var_t, eps_t, weight_t.to(ct), training)
    return (_out(da, a), _out(db, b), _out(dx, x),
            dweight_h.to(weight_h.dtype), dbias_h.to(bias_h.dtype),
            dweight_t.to(weight_t.dtype), dbias_t.to(bias_t.dtype))


# --------------------------------------------------------------------------
# ResFuse tail

def resfuse_tail_forward(u, h, weight_d, bias_d, running_mean_d, running_var_d,
                         x, w, weight_k, bias_k, running_mean_k, running_var_k,
                         training: bool, eps_d: float, eps_k: float):
    ct = compute_dtype(u.dtype)
    u_ = u.to(ct)
    mean_d, var_d = _stats(u_, training, running_mean_d, running_var_d)
    z = _bn(u_, mean_d, var_d, eps_d, weight_d, bias_d) + h.to(ct)
    if x is None:
        mean_k, var_k = u_.new_empty(0, dtype=STATS_DTYPE), u_.new_empty(0, dtype=STATS_DTYPE)
    else:
        v = carry_forward(x.to(ct), w.to(ct))
        mean_k, var_k = _stats(v, training, running_mean_k, running_var_k)
        z = z + _bn(v, mean_k, var_k, eps_k, weight_k, bias_k)
    return _out(torch.relu(z), u), mean_d, var_d, mean_k, var_k


def resfuse_tail_backward(grad_y, u, h, weight_d, bias_d, mean_d, var_d,
                          x, w, weight_k, bias_k, mean_k, var_k,
                          training: bool, eps_d: float, eps_k: float):
    ct = compute_dtype(u.dtype)
    g, u_ = grad_y.to(ct), u.to(ct)
    z = _bn(u_, mean_d, var_d, eps_d, weight_d, bias_d) + h.to(ct)
    if x is not None:
        x_, w_ = x.to(ct), w.to(ct)
        v = carry_forward(x_, w_)
        z = z + _bn(v, mean_k, var_k, eps_k, weight_k, bias_k)
    g = g * (z > 0)
    du, dweight_d, dbias_d = _bn_backward(g, u_, mean_d, var_d, eps_d, weight_d.to(ct), training)
    grads = [_out(du, u), _out(g, h), dweight_d.to(weight_d.dtype), dbias_d.to(bias_d.dtype)]
    if x is None:  # no carry: its four gradients are empty tensors
        none = u.new_empty(0)
        return (*grads, none, none.clone(), none.clone(), none.clone())
    dv, dweight_k, dbias_k = _bn_backward(g, v, mean_k, var_k, eps_k, weight_k.to(ct), training)
    dx, dw = carry_backward(dv, x_, w_)
    return (*grads, _out(dx.to(ct), x), dw.to(ct).reshape(w.shape).to(w.dtype),
            dweight_k.to(weight_k.dtype), dbias_k.to(bias_k.dtype))
