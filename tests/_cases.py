"""Random inputs for the fused ops and the float64 oracle they are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import copy

import torch
from torch import Tensor, nn

import resfuse_kernels as rk

from conftest import DEVICE, assert_close


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


# Each BatchNorm of an op gets its own eps and momentum, drawn without
# replacement from these, so no test is blind to one BatchNorm's standing in
# for the other's. momentum None is nn.BatchNorm2d's cumulative average: the
# op is handed 1 / num_batches_tracked, as the fused blocks hand it.
EPSILONS = (1e-5, 1e-3, 0.1)
MOMENTA = (0.1, 0.3, None)


@dataclass
class BN:
    """One BatchNorm's tensors, fp32 like a module's, with grads enabled."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    eps: float = 1e-5
    momentum: float | None = 0.1
    batches_tracked: int = 0  # before this step; used by momentum None

    @classmethod
    def random(cls, channels: int, dtype=torch.float32, **kwargs) -> "BN":
        kw = dict(device=DEVICE, dtype=dtype)
        return cls((1 + 0.5 * torch.randn(channels, **kw)).requires_grad_(),
                   (0.5 * torch.randn(channels, **kw)).requires_grad_(),
                   0.2 * torch.randn(channels, **kw),
                   0.5 + torch.rand(channels, **kw), **kwargs)

    @classmethod
    def distinct(cls, count: int, channels: int, dtype=torch.float32) -> list["BN"]:
        """``count`` (at most 3) random BatchNorms, no two with the same eps
        or the same momentum."""
        eps = torch.randperm(len(EPSILONS))[:count].tolist()
        momenta = torch.randperm(len(MOMENTA))[:count].tolist()
        return [cls.random(channels, dtype, eps=EPSILONS[e], momentum=MOMENTA[m],
                           batches_tracked=int(torch.randint(0, 4, ())))
                for e, m in zip(eps, momenta)]

    def op_momentum(self) -> float | Tensor:
        """The momentum the op is given: momentum None's cumulative average
        as a float64 0-dim tensor, as rk.nn.batch_norm_args makes it."""
        if self.momentum is None:
            return torch.tensor(1.0 / (self.batches_tracked + 1), dtype=torch.float64,
                                device=DEVICE)
        return self.momentum

    def module(self, training: bool, dtype=torch.float64) -> nn.BatchNorm2d:
        """An nn.BatchNorm2d holding copies of these tensors (the oracle's)."""
        bn = nn.BatchNorm2d(self.weight.shape[0], eps=self.eps, momentum=self.momentum)
        bn = bn.to(device=DEVICE, dtype=dtype).train(training)
        with torch.no_grad():
            bn.weight.copy_(self.weight)
            bn.bias.copy_(self.bias)
            bn.running_mean.copy_(self.running_mean)
            bn.running_var.copy_(self.running_var)
            bn.num_batches_tracked.fill_(self.batches_tracked)
        return bn

    def args(self) -> tuple:
        return self.weight, self.bias, self.running_mean, self.running_var


def _near_zero(z: Tensor, width: float) -> Tensor:
    return z.abs() <= width


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
        return cls(a, b, x, *BN.distinct(2, shape[1], param_dtype(dtype)), training)

    def bns(self) -> tuple:
        return self.bn_h, self.bn_t

    def inputs(self) -> list[Tensor]:
        return [self.a, self.b, self.x, self.bn_h.weight, self.bn_h.bias,
                self.bn_t.weight, self.bn_t.bias]

    def near_kink(self, width: float) -> Tensor:
        """Where the oracle's ReLU input, BN_h(a), is within ``width`` of 0
        (the output's positions)."""
        with torch.no_grad():
            return _near_zero(self.bn_h.module(self.training)(self.a.double()), width)

    def run(self) -> Tensor:
        h, t = self.bn_h, self.bn_t
        return rk.ops.highway_gate(self.a, self.b, self.x, *h.args(), *t.args(),
                                   training=self.training, momentum_h=h.op_momentum(),
                                   momentum_t=t.op_momentum(), eps_h=h.eps, eps_t=t.eps)

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
        pdtype = param_dtype(dtype)
        bn_d, bn_k = BN.distinct(2, shape[1], pdtype)
        case = cls(u, h, bn_d, training)
        if carry_channels is not None:
            n, k, hh, ww = shape
            case.x = activation((n, carry_channels, hh, ww), dtype, layout,
                                mean=x_mean).requires_grad_()
            case.w = (torch.randn(k, carry_channels, 1, 1, device=DEVICE, dtype=pdtype)
                      / carry_channels ** 0.5).requires_grad_()
            case.bn_k = bn_k
        return case

    def inputs(self) -> list[Tensor]:
        base = [self.u, self.h, self.bn_d.weight, self.bn_d.bias]
        if self.x is None:
            return base
        return base + [self.x, self.w, self.bn_k.weight, self.bn_k.bias]

    def near_kink(self, width: float) -> Tensor:
        """Where the oracle's ReLU input, z, is within ``width`` of 0."""
        with torch.no_grad():
            z = self.bn_d.module(self.training)(self.u.double()) + self.h.double()
            if self.x is not None:
                v = torch.nn.functional.conv2d(self.x.double(), self.w.double())
                z = z + self.bn_k.module(self.training)(v)
            return _near_zero(z, width)

    def run(self) -> Tensor:
        d, k = self.bn_d, self.bn_k
        carry = () if k is None else (self.x, self.w, *k.args())
        return rk.ops.resfuse_tail(self.u, self.h, *d.args(), *carry, training=self.training,
                                   momentum_d=d.op_momentum(), eps_d=d.eps,
                                   momentum_k=0.1 if k is None else k.op_momentum(),
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
        results.append([y, *grads, *(t.clone() for bn in case.bns()
                                     for t in (bn.running_mean, bn.running_var))])
    return results


def train_against_oracle(oracle: nn.Module, make_input, steps: int = 3,
                         wrap=lambda model: model, convert=rk.convert) -> nn.Module:
    """``oracle`` (a float64 reference model) against its fused twin, also
    in float64, under the suite's rule (conftest.RULE): same weights, same
    batches, and after every one of several NAG SGD steps the outputs,
    input and parameter gradients and the buffers (running statistics);
    then the eval outputs. ``wrap`` makes what runs of the fused model
    (torch.compile, say). Returns the fused model.

    In float64, because a network compounds the ops' roundings: in float32
    the fused and the reference blocks err as two draws of a spread that
    BatchNorm over four values makes wide (3-5x apart at times), so float32
    is held to PyTorch's error op by op (test_ops.py), and here any
    difference beyond float64's rounding is a bug. ``convert(model)`` makes
    the fused twin (in place)."""
    fused = convert(copy.deepcopy(oracle))
    models = (oracle, fused)
    runs = (oracle, wrap(fused))
    # NAG as the paper trains; a step small enough that three of them keep a
    # 19-layer network's outputs finite on random data
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
                  for m in models]

    def check(what, want, got):
        assert_close(got, want, torch.float64, what)

    def named(kind):  # (name, oracle's, fused's) per parameter or buffer
        return [(name, *ts) for (name, *ts) in zip(
            (n for n, _ in getattr(oracle, f"named_{kind}")()),
            *(getattr(m, kind)() for m in models))]

    for step in range(steps):
        x = make_input()
        inputs = [x.detach().clone().requires_grad_() for _ in runs]
        outs = []
        for run, opt, inp in zip(runs, optimizers, inputs):
            run.train()
            opt.zero_grad()
            out = run(inp)
            out.square().mean().backward()
            outs.append(out)
        check(f"step {step} output", *outs)
        check(f"step {step} input gradient", *(i.grad for i in inputs))
        for name, *params in named("parameters"):
            check(f"step {step} gradient of {name}", *(p.grad for p in params))
        for opt in optimizers:
            opt.step()
        for name, *buffers in named("buffers"):
            check(f"step {step} buffer {name}", *buffers)
    x = make_input()
    for run in runs:
        run.eval()
    with torch.no_grad():
        check("eval output", *(run(x) for run in runs))
    return fused
