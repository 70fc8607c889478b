"""Triton kernels of the ResFuse tail (math: :mod:`resfuse_kernels.ops.resfuse_tail`).

``y = relu(BN_d(u) + h [+ BN_k(W x)])``.

Forward, training: the statistics of ``u`` come from one statistics pass
(:func:`~._launch.batch_stats`). With the carry, ``v = W x`` is never
written: :func:`_carry_stats_kernel` reads ``x`` once, computes ``v`` tile by
tile with ``tl.dot`` in registers and keeps Welford moments of ``v`` per
register slot (accurate at large means). The apply pass then recomputes
``W x`` the same way as the prologue of the fused BN + add + BN + add + ReLU
epilogue.
Eval: the apply pass alone.

Every kernel computes the carry as ``v' = W (x - x0)``, with ``x0`` a
per-channel shift (:func:`_carry_shift`), and normalises it with the
shifted mean ``mean(v) - W x0`` (formed in float64): when ``x`` has a large
mean, ``W x`` in float32 would round away the spread that BatchNorm then
magnifies; ``v'`` is of the size of that spread. ``x0`` is the mean of a
sample of x's pixels where that mean exceeds the sample's spread, and 0
where x is centred: there a shift would only add a rounding (and, by the
first pixel, double the size of the operands), and W x is what PyTorch
computes.

(The statistics are not taken from x's covariance, ``var(v_k) = w_k^T
Cov(x) w_k``: that quadratic form loses ~1e-4 relative accuracy in float32
whenever ``var(v_k)`` is small against ``|w_k|^2 var(x)``, e.g. small
batches, where the direct route keeps the error of PyTorch's own fp32 BN.
It costs the same: one read of x and one C x K product per pixel.)

Backward: one reduction pass (recomputing ``z``, with ``W x`` for the
carry, summing ``g``, ``g (u - mean_d)``, ``g (v' - mean_k')`` per chunk and
writing ``dh = g = dy [z > 0]``, exact in the storage dtype;
:func:`~._launch.bn_grads` adds the chunks in float64 and writes the
BN gradients and the input gradients' coefficients) and one apply pass
reading ``dh`` and ``u`` (and ``x``) and writing ``du = k1 g + k2 (u -
mean_d) + k3`` and, with the carry, ``dv`` likewise: it never reads ``dy`` or ``h``, so the plain
tail's backward moves 7 activation tensors, not 8 (the carry's 10, not 11).
**dx and dW are torch matmuls** on that materialised ``dv``: ``dx = dv W``
and ``dW = dv^T x`` over the N*H*W pixels. ``dv`` is formed in float64
(:func:`~._launch.input_grad`) and kept in the product dtype, as the cuda
backend keeps it: float64 for float32/float64 storage, where both products
run in float64 (BatchNorm over few values amplifies a float32 product's
rounding, and a large mean of x cancels in dW), and float32 for bf16/fp16
storage, where both are float32 products. That is one extra write and two
reads of a K-channel tensor compared with a fully fused backward.

The carry's ``tl.dot`` runs with ``input_precision="ieee"`` (true float32
products; no TF32, whose 10-bit mantissa costs ~3 digits when the inputs
have large means) for float32 storage. For bf16/fp16 storage it runs on the
TF32 tensor cores: TF32 rounds ``x - x0`` and W to 10 mantissa bits,
where PyTorch's own bf16 convolution rounds W to bf16's 7, so the product
stays within PyTorch's error at that precision (the CUDA-core float32
product is several times slower on an H100/H200). float64 inputs use a
broadcast-multiply-sum instead of ``tl.dot``, which not every Triton
release supports for float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import STATS_DTYPE, compute_dtype, empty_output, product_dtype
from ._launch import (TAIL, TAIL_CL, TAIL_NCHW, TAIL_STAGES, autotune, batch_stats, bn_grads,
                      bn_params, bn_vectors, cdiv, channel_block, channel_vector, chunk_range,
                      chunk_stats, chunk_tile, compute_type, grid_tiles, in_output_format,
                      input_grad, launch, layout_flag, merge_slots, offsets, pointwise_tile,
                      scratch, shift_of, slot_welford, tile_coords, to_storage, view3)


@triton.jit
def _carry_tile(x_ptr, x0_ptr, w_ptr, n, s, smask, k, kmask, CX, sxn, sxc, sxs,
                CT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_X: tl.constexpr):
    """v' = W (x - x0) on a [BLOCK_S pixels, BLOCK_C output channels] tile
    (zero on masked pixels); W is (K, CX) dense, x0 the (CX,) shift."""
    acc = tl.zeros([BLOCK_S, BLOCK_C], CT)
    for c0 in range(0, CX, BLOCK_X):
        cx = c0 + tl.arange(0, BLOCK_X)
        xm = cx < CX
        tile_mask = smask[:, None] & xm[None, :]
        xt = tl.load(x_ptr + offsets(n, s, cx, sxn, sxc, sxs), mask=tile_mask, other=0.0).to(CT)
        xt = tl.where(tile_mask, xt - channel_vector(x0_ptr, cx, xm, CT)[None, :], 0.0)
        wt = tl.load(w_ptr + k.to(tl.int64)[None, :] * CX + cx[:, None],
                     mask=xm[:, None] & kmask[None, :], other=0.0).to(CT)
        if CT == tl.float64:
            acc += tl.sum(xt[:, :, None] * wt[None, :, :], axis=1)
        elif x_ptr.dtype.element_ty == tl.float32:
            acc += tl.dot(xt, wt, input_precision="ieee")
        else:  # bf16/fp16 storage: TF32 tensor cores keep 2 more bits than x has
            acc += tl.dot(xt, wt, input_precision="tf32")
    return acc


@triton.jit
def _bns(md_ptr, vd_ptr, wd_ptr, bd_ptr, mk_ptr, vk_ptr, wk_ptr, bk_ptr, c, cmask,
         HAS_CARRY: tl.constexpr, EPS_D: tl.constexpr, EPS_K: tl.constexpr, CT: tl.constexpr):
    """(mean, rstd, weight, bias) vectors of BN_d, then of BN_k (BN_d's again
    without the carry), loaded once per program (:func:`~._launch.bn_vectors`)."""
    md, rd, wd, bd = bn_vectors(md_ptr, vd_ptr, wd_ptr, bd_ptr, c, cmask, EPS_D, CT)
    mk, rk, wk, bk = md, rd, wd, bd
    if HAS_CARRY:
        mk, rk, wk, bk = bn_vectors(mk_ptr, vk_ptr, wk_ptr, bk_ptr, c, cmask, EPS_K, CT)
    return md, rd, wd, bd, mk, rk, wk, bk


@triton.jit
def _tail_z(u_ptr, h_ptr, x_ptr, x0_ptr, w_ptr, n, s, smask, c, cmask, mask,
            md, rd, wd, bd, mk, rk, wk, bk,
            CX, sun, suc, sus, shn, shc, shs, sxn, sxc, sxs,
            HAS_CARRY: tl.constexpr, CT: tl.constexpr, BLOCK_S: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr):
    """(z, u - mean_d, v' - mean_k') of a tile (the second again without the
    carry), from the vectors of :func:`_bns`; ``mk`` is the mean of the
    shifted carry v' = W (x - x0)."""
    u = tl.load(u_ptr + offsets(n, s, c, sun, suc, sus), mask=mask, other=0.0).to(CT)
    h = tl.load(h_ptr + offsets(n, s, c, shn, shc, shs), mask=mask, other=0.0).to(CT)
    uc = u - md[None, :]
    z = (uc * rd[None, :]) * wd[None, :] + bd[None, :] + h
    vc = uc
    if HAS_CARRY:
        v = _carry_tile(x_ptr, x0_ptr, w_ptr, n, s, smask, c, cmask, CX, sxn, sxc, sxs,
                        CT, BLOCK_S, BLOCK_C, BLOCK_X)
        vc = v - mk[None, :]
        z += (vc * rk[None, :]) * wk[None, :] + bk[None, :]
    return z, uc, vc


@autotune(TAIL_NCHW, TAIL_CL, TAIL, key=["C", "CX", "LAYOUT"], num_stages=TAIL_STAGES)
@triton.jit
def _forward_kernel(u_ptr, h_ptr, x_ptr, x0_ptr, w_ptr, y_ptr,
                    md_ptr, vd_ptr, wd_ptr, bd_ptr, mk_ptr, vk_ptr, wk_ptr, bk_ptr,
                    N, C, S, CX,
                    sun, suc, sus, shn, shc, shs, sxn, sxc, sxs, syn, syc, sys_, LAYOUT,
                    HAS_CARRY: tl.constexpr, EPS_D: tl.constexpr, EPS_K: tl.constexpr,
                    CT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_X: tl.constexpr):
    n, s, smask, c, cmask, mask = pointwise_tile(S, C, BLOCK_S, BLOCK_C)
    md, rd, wd, bd, mk, rk, wk, bk = _bns(md_ptr, vd_ptr, wd_ptr, bd_ptr, mk_ptr, vk_ptr,
                                          wk_ptr, bk_ptr, c, cmask, HAS_CARRY, EPS_D, EPS_K, CT)
    z, _, _ = _tail_z(u_ptr, h_ptr, x_ptr, x0_ptr, w_ptr, n, s, smask, c, cmask, mask,
                      md, rd, wd, bd, mk, rk, wk, bk,
                      CX, sun, suc, sus, shn, shc, shs, sxn, sxc, sxs,
                      HAS_CARRY, CT, BLOCK_S, BLOCK_C, BLOCK_X)
    y = tl.where(z < 0.0, 0.0, z)  # relu that keeps NaN, as torch.relu
    tl.store(y_ptr + offsets(n, s, c, syn, syc, sys_), to_storage(y, y_ptr), mask=mask)


@autotune(TAIL_NCHW, TAIL_CL, TAIL, key=["C", "CX", "LAYOUT"], num_stages=TAIL_STAGES)
@triton.jit
def _backward_reduce_kernel(g_ptr, part_ptr, u_ptr, h_ptr, x_ptr, x0_ptr, w_ptr, dh_ptr,
                            md_ptr, vd_ptr, wd_ptr, bd_ptr, mk_ptr, vk_ptr, wk_ptr, bk_ptr,
                            N, C, S, CX, sgn, sgc, sgs, sun, suc, sus, shn, shc, shs,
                            sxn, sxc, sxs, s2n, s2c, s2s, LAYOUT,
                            HAS_CARRY: tl.constexpr, EPS_D: tl.constexpr, EPS_K: tl.constexpr,
                            CT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_X: tl.constexpr):
    c, cmask = channel_block(C, BLOCK_C)
    md, rd, wd, bd, mk, rk, wk, bk = _bns(md_ptr, vd_ptr, wd_ptr, bd_ptr, mk_ptr, vk_ptr,
                                          wk_ptr, bk_ptr, c, cmask, HAS_CARRY, EPS_D, EPS_K, CT)
    t0, t1 = chunk_range(N, S, BLOCK_S)
    zero = tl.zeros([BLOCK_S, BLOCK_C], CT)
    sum_g, sum_gu, sum_gv = zero, zero, zero
    for t in range(t0, t1):
        n, s, smask, mask = chunk_tile(t, S, cmask, BLOCK_S)
        z, uc, vc = _tail_z(
            u_ptr, h_ptr, x_ptr, x0_ptr, w_ptr, n, s, smask, c, cmask, mask,
            md, rd, wd, bd, mk, rk, wk, bk, CX, sun, suc, sus, shn, shc, shs, sxn, sxc, sxs,
            HAS_CARRY, CT, BLOCK_S, BLOCK_C, BLOCK_X)
        dy = tl.load(g_ptr + offsets(n, s, c, sgn, sgc, sgs), mask=mask, other=0.0).to(CT)
        g = dy * (z > 0.0).to(CT)  # as composite: dy * [z > 0]; dy is 0 on masked lanes
        # dh is g, exact in the storage dtype (dy or 0): the apply pass reads it
        tl.store(dh_ptr + offsets(n, s, c, s2n, s2c, s2s), to_storage(g, dh_ptr), mask=mask)
        sum_g += g
        sum_gu += g * uc
        if HAS_CARRY:
            sum_gv += g * vc
    row = part_ptr + tl.program_id(0).to(tl.int64) * 3 * C
    tl.store(row + c, tl.sum(sum_g, axis=0), mask=cmask)
    tl.store(row + C + c, tl.sum(sum_gu, axis=0), mask=cmask)
    tl.store(row + 2 * C + c, tl.sum(sum_gv, axis=0), mask=cmask)


@autotune(TAIL_NCHW, TAIL_CL, TAIL, key=["C", "CX", "LAYOUT"], num_stages=TAIL_STAGES)
@triton.jit
def _backward_apply_kernel(dh_ptr, u_ptr, x_ptr, x0_ptr, w_ptr, du_ptr, dv_ptr, coef_ptr,
                           md_ptr, mk_ptr, N, C, S, CX,
                           s2n, s2c, s2s, sun, suc, sus, sxn, sxc, sxs,
                           s1n, s1c, s1s, s3n, s3c, s3s, LAYOUT,
                           HAS_CARRY: tl.constexpr, TRAINING: tl.constexpr, CT: tl.constexpr,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr):
    """du (and dv) from g = dh, written by the reduction pass, and in
    training u (and W x): no h, no z. ``md_ptr`` / ``mk_ptr``: the means of
    u and of v' (:func:`~._launch.input_grad`)."""
    n, s, smask, c, cmask, mask = pointwise_tile(S, C, BLOCK_S, BLOCK_C)
    g = tl.load(dh_ptr + offsets(n, s, c, s2n, s2c, s2s), mask=mask, other=0.0).to(CT)
    u = g  # in eval dz = k1 g: neither u nor W x is read
    if TRAINING:
        u = tl.load(u_ptr + offsets(n, s, c, sun, suc, sus), mask=mask, other=0.0).to(CT)
    du = input_grad(coef_ptr, md_ptr, c, cmask, C, g, u, TRAINING, CT)
    tl.store(du_ptr + offsets(n, s, c, s1n, s1c, s1s), to_storage(du, du_ptr), mask=mask)
    if HAS_CARRY:
        v = g
        if TRAINING:
            v = _carry_tile(x_ptr, x0_ptr, w_ptr, n, s, smask, c, cmask, CX, sxn, sxc, sxs,
                            CT, BLOCK_S, BLOCK_C, BLOCK_X)
        dv = input_grad(coef_ptr + 3 * C, mk_ptr, c, cmask, C, g, v, TRAINING, tl.float64)
        tl.store(dv_ptr + offsets(n, s, c, s3n, s3c, s3s), to_storage(dv, dv_ptr), mask=mask)


@autotune(TAIL_NCHW, TAIL_CL, TAIL, key=["C", "CX", "LAYOUT"], num_stages=TAIL_STAGES)
@triton.jit
def _carry_stats_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, x0_ptr, w_ptr, N, C, S, CX,
                        sxn, sxc, sxs, LAYOUT, CT: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr):
    """Per-chunk (count, mean, M2) of v' = W (x - x0), computed tile by tile in registers."""
    c, cmask = channel_block(C, BLOCK_C)
    t0, t1 = chunk_range(N, S, BLOCK_S)
    count = tl.zeros([BLOCK_S], CT)
    zero = tl.zeros([BLOCK_S, BLOCK_C], CT)
    mean, m2 = zero, zero
    for t in range(t0, t1):
        n, s, rows = tile_coords(t, S, BLOCK_S)
        count += rows.to(CT)
        v = _carry_tile(x_ptr, x0_ptr, w_ptr, n, s, rows, c, cmask, CX,
                        sxn, sxc, sxs, CT, BLOCK_S, BLOCK_C, BLOCK_X)
        mean, m2 = slot_welford(mean, m2, v, rows, 1.0 / tl.maximum(count, 1.0))
    chunk = tl.program_id(0)
    row = chunk.to(tl.int64) * C
    total = merge_slots(count, mean, m2, mean_ptr + row, m2_ptr + row, c, cmask)
    tl.store(cnt_ptr + chunk + c * 0, total, mask=c == 0)


# Pixels sampled for the carry's shift: the first ones in image-major order.
SHIFT_SAMPLE = 128


@triton.jit
def _carry_shift_kernel(x_ptr, x0_ptr, P, S, CX, sxn, sxc, sxs, CT: tl.constexpr,
                        SAMPLE: tl.constexpr, BLOCK_X: tl.constexpr):
    """x0 per input channel (program = block of channels): the shift
    (:func:`~._launch.shift_of`) of x's first P <= SAMPLE pixels
    (image-major), taken in float64."""
    cx = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    xm = cx < CX
    p = tl.arange(0, SAMPLE)
    n = (p // S).to(tl.int64)
    s = (p % S).to(tl.int64)
    mask = (p < P)[:, None] & xm[None, :]
    v = tl.load(x_ptr + n[:, None] * sxn + s[:, None] * sxs + cx.to(tl.int64)[None, :] * sxc,
                mask=mask, other=0.0).to(tl.float64)
    # 12 significant bits (twelve_bits): with all 24, the bias of x - x0
    # was amplified by BatchNorm over three values to 4x PyTorch's error in dW
    tl.store(x0_ptr + cx, shift_of(v, mask, P * 1.0).to(CT), mask=xm)


@triton.jit
def _shift_mean_kernel(mean_ptr, out_ptr, w_ptr, x0_ptr, K, CX, SIGN: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_X: tl.constexpr):
    """out = mean + SIGN * W x0 per output channel, in float64, stored in out's dtype."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    wx0 = tl.zeros([BLOCK_K], tl.float64)
    for c0 in range(0, CX, BLOCK_X):
        cx = c0 + tl.arange(0, BLOCK_X)
        xm = cx < CX
        x0 = tl.load(x0_ptr + cx, mask=xm, other=0.0).to(tl.float64)
        wt = tl.load(w_ptr + k.to(tl.int64)[:, None] * CX + cx[None, :],
                     mask=kmask[:, None] & xm[None, :], other=0.0).to(tl.float64)
        wx0 += tl.sum(wt * x0[None, :], axis=1)
    mean = tl.load(mean_ptr + k, mask=kmask, other=0.0).to(tl.float64)
    tl.store(out_ptr + k, (mean + SIGN * wx0).to(out_ptr.dtype.element_ty), mask=kmask)


def _carry_shift(x3: torch.Tensor, sx) -> torch.Tensor:
    """The carry's shift x0 (the module docstring says why), (CX,) in the
    compute dtype: one launch; the same x gives the same x0 in the forward
    and the backward."""
    n, cx, h, w = x3.shape
    x0 = torch.empty(cx, dtype=compute_dtype(x3.dtype), device=x3.device)
    launch(_carry_shift_kernel, (cdiv(cx, 16),), x3, x0, min(n * h * w, SHIFT_SAMPLE), h * w,
           cx, *sx, CT=compute_type(x3.dtype), SAMPLE=SHIFT_SAMPLE, BLOCK_X=16)
    return x0


def _shift_mean(mean: torch.Tensor, w2: torch.Tensor, x0: torch.Tensor, sign: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``mean + sign * W x0`` in float64, returned in ``dtype``: +1 turns the
    mean of v' into mean(v) (STATS_DTYPE), -1 the other way (the compute
    dtype; one launch, where a float64 torch.mv and its casts would take
    several)."""
    k, cx = w2.shape
    out = torch.empty(k, dtype=dtype, device=x0.device)
    launch(_shift_mean_kernel, (cdiv(k, 64),), mean.contiguous(), out, w2, x0, k, cx,
           SIGN=sign, BLOCK_K=64, BLOCK_X=32)
    return out


def _carry_stats(x3, sx, x0, w2):
    """(mean', biased var) of v' = W (x - x0) per output channel, mean' in
    the compute dtype, var in STATS_DTYPE; v' itself is never stored."""
    n, _, h, wdt = x3.shape
    k, cx = w2.shape
    return chunk_stats(_carry_stats_kernel, x3, k, k, x0, w2, n, k, h * wdt, cx, *sx,
                       layout_flag(sx), mean_dtype=compute_dtype(x3.dtype))


def resfuse_tail_forward(u, h, weight_d, bias_d, running_mean_d, running_var_d,
                         x, w, weight_k, bias_k, running_mean_k, running_var_k,
                         training: bool, eps_d: float, eps_k: float):
    cdt = compute_dtype(u.dtype)
    n, k, hh, ww = u.shape
    s = hh * ww
    carry = x is not None
    (u3, su), (h3, sh) = view3(u), view3(h)
    y = empty_output(u)
    if carry:
        x3, sx = view3(x)
        w2 = w.reshape(w.shape[0], w.shape[1]).contiguous()
        cx = w2.shape[1]
    else:
        x3, sx, w2, cx = u3, su, u3, 0
    x0 = _carry_shift(x3, sx) if carry and u.numel() else u3  # u3: a stand-in, never read
    if training:
        mean_d, var_d = batch_stats(u3, su)
    else:
        mean_d, var_d = (t.to(STATS_DTYPE, copy=True) for t in (running_mean_d, running_var_d))
    if not carry:
        mean_k, var_k = (u.new_empty(0, dtype=STATS_DTYPE) for _ in range(2))
    elif not training:
        mean_k, var_k = (t.to(STATS_DTYPE, copy=True) for t in (running_mean_k, running_var_k))
        if u.numel():
            shifted_mean_k = _shift_mean(running_mean_k, w2, x0, -1, cdt)
    elif u.numel() == 0:
        mean_k, var_k = (u.new_zeros(k, dtype=STATS_DTYPE) for _ in range(2))
    else:
        shifted_mean_k, var_k = _carry_stats(x3, sx, x0, w2)
        mean_k = _shift_mean(shifted_mean_k, w2, x0, 1, STATS_DTYPE)
    if u.numel() == 0:
        return y, mean_d, var_d, mean_k, var_k
    pd = bn_params(mean_d, var_d, weight_d, bias_d)
    pk = bn_params(shifted_mean_k, var_k, weight_k, bias_k) if carry else pd
    launch(_forward_kernel, grid_tiles(n, k, s), u3, h3, x3, x0, w2, y, *pd, *pk, n, k, s, cx,
           *su, *sh, *sx, *view3(y)[1], layout_flag(su), HAS_CARRY=carry,
           EPS_D=float(eps_d), EPS_K=float(eps_k), CT=compute_type(u.dtype))
    return y, mean_d, var_d, mean_k, var_k


def resfuse_tail_backward(grad_y, u, h, weight_d, bias_d, mean_d, var_d,
                          x, w, weight_k, bias_k, mean_k, var_k,
                          training: bool, eps_d: float, eps_k: float):
    ct, prod = compute_type(u.dtype), product_dtype(u.dtype)
    n, k, hh, ww = u.shape
    s = hh * ww
    carry = x is not None
    du, dh = empty_output(u), empty_output(h, dtype=u.dtype)
    if u.numel() == 0:
        grads = [du, dh, torch.zeros_like(weight_d), torch.zeros_like(bias_d)]
        if not carry:
            return (*grads, *(u.new_empty(0) for _ in range(4)))
        return (*grads, empty_output(x), *(torch.zeros_like(p) for p in (w, weight_k, bias_k)))
    (g3, sg), (u3, su), (h3, sh) = (view3(t) for t in (grad_y, u, h))
    if carry:
        x3, sx = view3(x)
        w2 = w.reshape(w.shape[0], w.shape[1]).contiguous()
        cx = w2.shape[1]
        # dv as dense (N, H*W, K): the (pixels, K) matrix of the dx / dW
        # matmuls, in their dtype (the module docstring says which)
        dv = torch.empty(n, s, k, dtype=prod, device=u.device)
        sdv = (s * k, 1, k)
        x0 = _carry_shift(x3, sx)  # the forward's shift: same x, same x0
        # in float64: bn_grads takes the sums about it, not about
        # its rounding the kernels use
        shifted_mean_k = _shift_mean(mean_k, w2, x0, -1, torch.float64)
    else:
        x3, sx, w2, cx, x0 = u3, su, u3, 0, u3
        dv, sdv = scratch(du), (0, 0, 0)  # never written
    pd = bn_params(mean_d, var_d, weight_d, bias_d)
    pk = bn_params(shifted_mean_k, var_k, weight_k, bias_k) if carry else pd
    # partial rows: sum g, sum g (u - mean_d), sum g (v' - mean_k')
    bns = [(0, 1, eps_d, mean_d, var_d, weight_d, bias_d)]
    if carry:
        bns.append((0, 2, eps_k, shifted_mean_k, var_k, weight_k, bias_k))
    affine, coef = bn_grads(
        _backward_reduce_kernel, g3, 3, bns, training, u3, h3, x3, x0, w2, dh, *pd, *pk,
        n, k, s, cx, *sg, *su, *sh, *sx, *view3(dh)[1], layout_flag(su), HAS_CARRY=carry,
        EPS_D=float(eps_d), EPS_K=float(eps_k))
    launch(_backward_apply_kernel, grid_tiles(n, k, s), dh, u3, x3, x0, w2, du, dv, coef,
           pd[0], pk[0], n, k, s, cx, *view3(dh)[1], *su, *sx, *view3(du)[1], *sdv,
           layout_flag(su), HAS_CARRY=carry, TRAINING=bool(training), CT=ct)
    grads = (du, dh, *affine[:2])
    if not carry:
        return (*grads, *(u.new_empty(0) for _ in range(4)))
    # torch matmuls on the materialised dv (see the module docstring)
    dv2 = dv.view(n * s, k)
    dx = (dv2 @ w2.to(prod)).view(n, hh, ww, cx).permute(0, 3, 1, 2)
    x2 = x.to(prod).permute(0, 2, 3, 1).reshape(n * s, cx)  # a view if channels_last
    dw = dv2.t() @ x2
    # dx is (N, H, W, CX) in memory: the output already when x is channels_last
    dx = in_output_format(dx.to(x.dtype), x)
    return (*grads, dx, dw.reshape(w.shape).to(w.dtype), *affine[2:])
