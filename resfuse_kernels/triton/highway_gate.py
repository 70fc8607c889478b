"""Triton kernels of the highway gate (math: :mod:`resfuse_kernels.ops.highway_gate`).

Forward, training: one statistics pass reading ``a`` and ``b`` together
(:func:`~._launch.batch_stats`, Welford moments per register slot, plus a tiny
merge kernel over the per-chunk partials), then one apply pass reading
``a, b, x`` and writing ``y``. Eval: the apply pass alone, on the running
statistics. The apply pass folds each BatchNorm into a per-channel
``scale = weight * rstd`` and computes ``(a - mean) * scale + bias``.

Backward: one reduction pass (per-chunk partial sums of ``g_h``,
``g_h (a - mean_h)``, ``g_t``, ``g_t (b - mean_t)``, recomputing ``H`` and
``T``; summed over the chunks in float64 by
:func:`~._launch.bn_grads`, which also writes the four affine
gradients and each input gradient's coefficients) and one apply pass
writing ``da = k1 g_h + k2 (a - mean_h) + k3``, ``db`` likewise, and ``dx``.
Every kernel is fused; the host allocates and launches, no torch arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import STATS_DTYPE, empty_output
from ._launch import (TILE, TILE_CL, TILE_NCHW, autotune, batch_stats, bn_grads, bn_params,
                      bn_vectors, channel_block, chunk_range, chunk_tile, compute_type,
                      grid_tiles, input_grad, launch, layout_flag, offsets, pointwise_tile,
                      to_storage, view3)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) without overflow: exp of -|z| only."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r)


@triton.jit
def _gate_grads(g, a, b, x, mh, rh, wh, bh, mt, rt, wt, bt, CT: tl.constexpr):
    """(g_h, g_t, T) of a tile: the gradients reaching the two BatchNorms'
    outputs, as the composite's g T [H > 0] and g (H - x) T (1 - T), and
    the gate T, from the BatchNorms' per-channel (mean, rstd, weight, bias)
    vectors (:func:`~._launch.bn_vectors`)."""
    a_hat = (a - mh[None, :]) * rh[None, :]
    b_hat = (b - mt[None, :]) * rt[None, :]
    zh = a_hat * wh[None, :] + bh[None, :]
    gh = tl.where(zh < 0.0, 0.0, zh)  # relu that keeps NaN, as torch.relu
    gt = _sigmoid(b_hat * wt[None, :] + bt[None, :])
    return g * gt * (gh > 0.0).to(CT), g * (gh - x) * gt * (1.0 - gt), gt


@autotune(TILE_NCHW, TILE_CL, TILE, key=["C", "LAYOUT"])
@triton.jit
def _forward_kernel(a_ptr, b_ptr, x_ptr, y_ptr,
                    mh_ptr, vh_ptr, wh_ptr, bh_ptr, mt_ptr, vt_ptr, wt_ptr, bt_ptr,
                    N, C, S, san, sac, sas, sbn, sbc, sbs, sxn, sxc, sxs, syn, syc, sys_, LAYOUT,
                    EPS_H: tl.constexpr, EPS_T: tl.constexpr, CT: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, s, smask, c, cmask, mask = pointwise_tile(S, C, BLOCK_S, BLOCK_C)
    a = tl.load(a_ptr + offsets(n, s, c, san, sac, sas), mask=mask, other=0.0).to(CT)
    b = tl.load(b_ptr + offsets(n, s, c, sbn, sbc, sbs), mask=mask, other=0.0).to(CT)
    x = tl.load(x_ptr + offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(CT)
    mh, rh, wh, bh = bn_vectors(mh_ptr, vh_ptr, wh_ptr, bh_ptr, c, cmask, EPS_H, CT)
    mt, rt, wt, bt = bn_vectors(mt_ptr, vt_ptr, wt_ptr, bt_ptr, c, cmask, EPS_T, CT)
    scale_h = wh * rh  # BN folded: (a - mean) * scale + bias
    scale_t = wt * rt
    zh = (a - mh[None, :]) * scale_h[None, :] + bh[None, :]
    zt = (b - mt[None, :]) * scale_t[None, :] + bt[None, :]
    gh = tl.where(zh < 0.0, 0.0, zh)  # relu that keeps NaN, as torch.relu
    gt = _sigmoid(zt)
    # H T + x (1 - T) in that form, not x + T (H - x): an infinite x gives
    # inf - inf = NaN in the latter, +-Inf (as PyTorch) here.
    y = gh * gt + x * (1.0 - gt)
    tl.store(y_ptr + offsets(n, s, c, syn, syc, sys_), to_storage(y, y_ptr), mask=mask)


@autotune(TILE_NCHW, TILE_CL, TILE, key=["C", "LAYOUT"])
@triton.jit
def _backward_reduce_kernel(g_ptr, part_ptr, a_ptr, b_ptr, x_ptr,
                            mh_ptr, vh_ptr, wh_ptr, bh_ptr, mt_ptr, vt_ptr, wt_ptr, bt_ptr,
                            N, C, S,
                            sgn, sgc, sgs, san, sac, sas, sbn, sbc, sbs, sxn, sxc, sxs, LAYOUT,
                            EPS_H: tl.constexpr, EPS_T: tl.constexpr, CT: tl.constexpr,
                            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    c, cmask = channel_block(C, BLOCK_C)
    mh, rh, wh, bh = bn_vectors(mh_ptr, vh_ptr, wh_ptr, bh_ptr, c, cmask, EPS_H, CT)
    mt, rt, wt, bt = bn_vectors(mt_ptr, vt_ptr, wt_ptr, bt_ptr, c, cmask, EPS_T, CT)
    t0, t1 = chunk_range(N, S, BLOCK_S)
    zero = tl.zeros([BLOCK_S, BLOCK_C], CT)
    sum_gh, sum_gha, sum_gt, sum_gtb = zero, zero, zero, zero
    for t in range(t0, t1):
        n, s, _, mask = chunk_tile(t, S, cmask, BLOCK_S)
        g = tl.load(g_ptr + offsets(n, s, c, sgn, sgc, sgs), mask=mask, other=0.0).to(CT)
        a = tl.load(a_ptr + offsets(n, s, c, san, sac, sas), mask=mask, other=0.0).to(CT)
        b = tl.load(b_ptr + offsets(n, s, c, sbn, sbc, sbs), mask=mask, other=0.0).to(CT)
        x = tl.load(x_ptr + offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(CT)
        g_h, g_t, _ = _gate_grads(g, a, b, x, mh, rh, wh, bh, mt, rt, wt, bt, CT)
        sum_gh += g_h
        sum_gha += g_h * (a - mh[None, :])
        sum_gt += g_t
        sum_gtb += g_t * (b - mt[None, :])
    row = part_ptr + tl.program_id(0).to(tl.int64) * 4 * C
    tl.store(row + c, tl.sum(sum_gh, axis=0), mask=cmask)
    tl.store(row + C + c, tl.sum(sum_gha, axis=0), mask=cmask)
    tl.store(row + 2 * C + c, tl.sum(sum_gt, axis=0), mask=cmask)
    tl.store(row + 3 * C + c, tl.sum(sum_gtb, axis=0), mask=cmask)


@autotune(TILE_NCHW, TILE_CL, TILE, key=["C", "LAYOUT"])
@triton.jit
def _backward_apply_kernel(g_ptr, a_ptr, b_ptr, x_ptr, da_ptr, db_ptr, dx_ptr, coef_ptr,
                           mh_ptr, vh_ptr, wh_ptr, bh_ptr, mt_ptr, vt_ptr, wt_ptr, bt_ptr,
                           N, C, S, sgn, sgc, sgs, san, sac, sas, sbn, sbc, sbs, sxn, sxc, sxs,
                           s1n, s1c, s1s, s2n, s2c, s2s, s3n, s3c, s3s, LAYOUT,
                           TRAINING: tl.constexpr, EPS_H: tl.constexpr, EPS_T: tl.constexpr,
                           CT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n, s, smask, c, cmask, mask = pointwise_tile(S, C, BLOCK_S, BLOCK_C)
    g = tl.load(g_ptr + offsets(n, s, c, sgn, sgc, sgs), mask=mask, other=0.0).to(CT)
    a = tl.load(a_ptr + offsets(n, s, c, san, sac, sas), mask=mask, other=0.0).to(CT)
    b = tl.load(b_ptr + offsets(n, s, c, sbn, sbc, sbs), mask=mask, other=0.0).to(CT)
    x = tl.load(x_ptr + offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(CT)
    mh, rh, wh, bh = bn_vectors(mh_ptr, vh_ptr, wh_ptr, bh_ptr, c, cmask, EPS_H, CT)
    mt, rt, wt, bt = bn_vectors(mt_ptr, vt_ptr, wt_ptr, bt_ptr, c, cmask, EPS_T, CT)
    g_h, g_t, gt = _gate_grads(g, a, b, x, mh, rh, wh, bh, mt, rt, wt, bt, CT)
    dx = g * (1.0 - gt)
    da = input_grad(coef_ptr, mh_ptr, c, cmask, C, g_h, a, TRAINING, CT)
    db = input_grad(coef_ptr + 3 * C, mt_ptr, c, cmask, C, g_t, b, TRAINING, CT)
    tl.store(da_ptr + offsets(n, s, c, s1n, s1c, s1s), to_storage(da, da_ptr), mask=mask)
    tl.store(db_ptr + offsets(n, s, c, s2n, s2c, s2s), to_storage(db, db_ptr), mask=mask)
    tl.store(dx_ptr + offsets(n, s, c, s3n, s3c, s3s), to_storage(dx, dx_ptr), mask=mask)


def highway_gate_forward(a, b, x, weight_h, bias_h, running_mean_h, running_var_h,
                         weight_t, bias_t, running_mean_t, running_var_t,
                         training: bool, eps_h: float, eps_t: float):
    n, c, h, w = a.shape
    (a3, sa), (b3, sb), (x3, sx) = (view3(t) for t in (a, b, x))
    if training:
        mean_h, var_h, mean_t, var_t = batch_stats(a3, sa, b3, sb)
    else:
        mean_h, var_h, mean_t, var_t = (t.to(STATS_DTYPE, copy=True) for t in (
            running_mean_h, running_var_h, running_mean_t, running_var_t))
    y = empty_output(a)
    if a.numel() == 0:
        return y, mean_h, var_h, mean_t, var_t
    params = bn_params(mean_h, var_h, weight_h, bias_h, mean_t, var_t, weight_t, bias_t)
    launch(_forward_kernel, grid_tiles(n, c, h * w), a3, b3, x3, y, *params, n, c, h * w,
           *sa, *sb, *sx, *view3(y)[1], layout_flag(sa), EPS_H=float(eps_h),
           EPS_T=float(eps_t), CT=compute_type(a.dtype))
    return y, mean_h, var_h, mean_t, var_t


def highway_gate_backward(grad_y, a, b, x, weight_h, bias_h, mean_h, var_h,
                          weight_t, bias_t, mean_t, var_t,
                          training: bool, eps_h: float, eps_t: float):
    n, c, h, w = a.shape
    s = h * w
    da, db, dx = empty_output(a), empty_output(b), empty_output(x)
    if a.numel() == 0:
        return (da, db, dx, *(torch.zeros_like(p) for p in (weight_h, bias_h, weight_t, bias_t)))
    (g3, sg), (a3, sa), (b3, sb), (x3, sx) = (view3(t) for t in (grad_y, a, b, x))
    ct = compute_type(a.dtype)
    params = bn_params(mean_h, var_h, weight_h, bias_h, mean_t, var_t, weight_t, bias_t)
    # partial rows: sum g_h, sum g_h (a - mean_h), sum g_t, sum g_t (b - mean_t)
    bns = [(0, 1, eps_h, mean_h, var_h, weight_h, bias_h),
           (2, 3, eps_t, mean_t, var_t, weight_t, bias_t)]
    affine, coef = bn_grads(_backward_reduce_kernel, g3, 4, bns, training, a3, b3, x3, *params,
                            n, c, s, *sg, *sa, *sb, *sx, layout_flag(sa), EPS_H=float(eps_h),
                            EPS_T=float(eps_t))
    launch(_backward_apply_kernel, grid_tiles(n, c, s), g3, a3, b3, x3, da, db, dx, coef,
           *params, n, c, s, *sg, *sa, *sb, *sx, *view3(da)[1], *view3(db)[1], *view3(dx)[1],
           layout_flag(sa), TRAINING=bool(training), EPS_H=float(eps_h), EPS_T=float(eps_t),
           CT=ct)
    return (da, db, dx, *affine)
