"""Random inputs for the fused ops and the float64 oracle they are checked against."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import resfuse_kernels as rk

from conftest import DEVICE


def lay_out(t: Tensor, layout: str) -> Tensor:
    """``t`` (contiguous) in ``layout``: "nchw", "channels_last" or "strided".

    "strided" is a non-contiguous view: every other element of a buffer
    twice as wide.
    """
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(layout)


def activation(shape, dtype, layout="nchw", mean=0.0) -> Tensor:
    return lay_out(torch.randn(shape, device=DEVICE).add_(mean).to(dtype), layout)


# Images this many elements apart put the last image's offsets past 2**31
# (int32 overflows there) in a batch of three.
FAR_STRIDE = 2 ** 30 + 64


def far_apart(tensors: list[Tensor], layout: str) -> list[Tensor]:
    """Copies of ``tensors`` (same shape and dtype) as views of one buffer of
    over 2**31 elements, image ``n`` of each at ``n * FAR_STRIDE``, laid out
    inside an image as ``layout`` ("nchw" or "channels_last"). Only the
    images are written: the OS maps a page on first touch, so the buffer's
    8 GiB cost a few pages of memory on a CPU."""
    n, c, h, w = tensors[0].shape
    inner = {"nchw": (h * w, w, 1), "channels_last": (1, w * c, c)}[layout]
    slot = c * h * w
    buffer = torch.empty((n - 1) * FAR_STRIDE + len(tensors) * slot,
                         dtype=tensors[0].dtype, device=tensors[0].device)
    views = []
    for i, t in enumerate(tensors):
        view = buffer.as_strided(t.shape, (FAR_STRIDE, *inner), i * slot)
        view.copy_(t.detach())
        views.append(view.requires_grad_(t.requires_grad))
    return views


def one_ulp_off(t: Tensor) -> Tensor:
    """``t`` (a leaf) with every element one unit in the last place of its
    dtype up or down, at random."""
    t = t.detach()
    up = torch.rand(t.shape, device=t.device) < 0.5
    step = torch.where(up, float("inf"), float("-inf")).to(t.dtype)
    return torch.nextafter(t, step).requires_grad_()


def nudged(case):
    """A copy of a HighwayCase or TailCase whose activations are each one
    ulp off: what a backward-stable implementation's rounding amounts to."""
    names = [f.name for f in dataclasses.fields(case)
             if f.name in ("a", "b", "x", "u", "h") and getattr(case, f.name) is not None]
    return dataclasses.replace(case, **{n: one_ulp_off(getattr(case, n)) for n in names})


@dataclass
class BN:
    """One BatchNorm's tensors, fp32 like a module's, with grads enabled."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    eps: float = 1e-5
    momentum: float = 0.1

    @classmethod
    def random(cls, channels: int, dtype=torch.float32, **kwargs) -> "BN":
        kw = dict(device=DEVICE, dtype=dtype)
        return cls((1 + 0.5 * torch.randn(channels, **kw)).requires_grad_(),
                   (0.5 * torch.randn(channels, **kw)).requires_grad_(),
                   0.2 * torch.randn(channels, **kw),
                   0.5 + torch.rand(channels, **kw), **kwargs)

    def module(self, training: bool, dtype=torch.float64) -> nn.BatchNorm2d:
        """An nn.BatchNorm2d holding copies of these tensors (the oracle's)."""
        bn = nn.BatchNorm2d(self.weight.shape[0], eps=self.eps, momentum=self.momentum)
        bn = bn.to(device=DEVICE, dtype=dtype).train(training)
        with torch.no_grad():
            bn.weight.copy_(self.weight)
            bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
        return bn

    def args(self) -> tuple:
        return self.weight, self.bias, self.running_mean, self.running_var


def leaf(t: Tensor, dtype) -> Tensor:
    return t.detach().to(dtype).requires_grad_()


def param_dtype(dtype):
    """Modules keep fp32 parameters under low-precision activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class HighwayCase:
    a: Tensor
    b: Tensor
    x: Tensor
    bn_h: BN
    bn_t: BN
    training: bool

    @classmethod
    def random(cls, shape, dtype=torch.float32, layout="nchw", training=True):
        a, b, x = (activation(shape, dtype, layout).requires_grad_() for _ in range(3))
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        return cls(a, b, x, BN.random(shape[1], pdtype), BN.random(shape[1], pdtype), training)

    def bns(self) -> tuple:
        return self.bn_h, self.bn_t

    def inputs(self) -> list[Tensor]:
        return [self.a, self.b, self.x, self.bn_h.weight, self.bn_h.bias,
                self.bn_t.weight, self.bn_t.bias]

    def run(self) -> Tensor:
        h, t = self.bn_h, self.bn_t
        return rk.ops.highway_gate(self.a, self.b, self.x, *h.args(), *t.args(),
                                   training=self.training, momentum_h=h.momentum,
                                   momentum_t=t.momentum, eps_h=h.eps, eps_t=t.eps)

    def reference(self, dtype=torch.float64):
        """(y, leaves matching inputs(), BN modules): the reference formula
        with activations stored in ``dtype``; float64 is the oracle."""
        pd = param_dtype(dtype)
        bn_h, bn_t = self.bn_h.module(self.training, pd), self.bn_t.module(self.training, pd)
        a, b, x = (leaf(t, dtype) for t in (self.a, self.b, self.x))
        y = rk.reference.highway_gate(a, b, x, bn_h, bn_t)
        return y, [a, b, x, bn_h.weight, bn_h.bias, bn_t.weight, bn_t.bias], (bn_h, bn_t)


@dataclass
class TailCase:
    u: Tensor
    h: Tensor
    bn_d: BN
    training: bool
    x: Tensor | None = None
    w: Tensor | None = None
    bn_k: BN | None = None

    @classmethod
    def random(cls, shape, dtype=torch.float32, layout="nchw", training=True,
               carry_channels: int | None = None, x_mean: float = 0.0):
        u, h = (activation(shape, dtype, layout).requires_grad_() for _ in range(2))
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        case = cls(u, h, BN.random(shape[1], pdtype), training)
        if carry_channels is not None:
            n, k, hh, ww = shape
            case.x = activation((n, carry_channels, hh, ww), dtype, layout,
                                mean=x_mean).requires_grad_()
            case.w = (torch.randn(k, carry_channels, 1, 1, device=DEVICE, dtype=pdtype)
                      / carry_channels ** 0.5).requires_grad_()
            case.bn_k = BN.random(k, pdtype)
        return case

    def inputs(self) -> list[Tensor]:
        base = [self.u, self.h, self.bn_d.weight, self.bn_d.bias]
        if self.x is None:
            return base
        return base + [self.x, self.w, self.bn_k.weight, self.bn_k.bias]

    def run(self) -> Tensor:
        d, k = self.bn_d, self.bn_k
        carry = () if k is None else (self.x, self.w, *k.args())
        return rk.ops.resfuse_tail(self.u, self.h, *d.args(), *carry, training=self.training,
                                   momentum_d=d.momentum, eps_d=d.eps,
                                   momentum_k=0.1 if k is None else k.momentum,
                                   eps_k=1e-5 if k is None else k.eps)

    def reference(self, dtype=torch.float64):
        """(y, leaves matching inputs(), BN modules): the reference formula
        with activations (and the carry convolution) in ``dtype``."""
        pd = param_dtype(dtype)
        bn_d = self.bn_d.module(self.training, pd)
        u, h = leaf(self.u, dtype), leaf(self.h, dtype)
        if self.x is None:
            return rk.reference.resfuse_tail(u, h, bn_d), [u, h, bn_d.weight, bn_d.bias], (bn_d,)
        bn_k = self.bn_k.module(self.training, pd)
        x = leaf(self.x, dtype)
        carry = nn.Conv2d(x.shape[1], u.shape[1], 1, bias=False).to(DEVICE, dtype)
        with torch.no_grad():
            carry.weight.copy_(self.w)
        y = rk.reference.resfuse_tail(u, h, bn_d, x, carry, bn_k)
        return y, [u, h, bn_d.weight, bn_d.bias, x, carry.weight, bn_k.weight,
                   bn_k.bias], (bn_d, bn_k)

    def bns(self) -> tuple:
        return (self.bn_d,) if self.bn_k is None else (self.bn_d, self.bn_k)


def steps_from_one_state(case, runs) -> list[list[Tensor]]:
    """Per ``run`` (a callable taking ``case`` and returning its output y):
    [y, the gradients of sum(y) for ``case.inputs()``, every running
    statistic after the step], each run starting from the running
    statistics ``case`` holds now."""
    start = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in case.bns()]
    results = []
    for run in runs:
        for bn, (mean, var) in zip(case.bns(), start):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        y = run(case)
        grads = torch.autograd.grad(y, case.inputs(), torch.ones_like(y))
        results.append([y, *grads, *(t for bn in case.bns()
                                     for t in (bn.running_mean, bn.running_var))])
    return results
