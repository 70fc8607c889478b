"""The Triton backend's four functions against the float64 oracle.

The oracle is the composite backend (:mod:`resfuse_kernels.ops.composite`)
run on the same inputs upcast to float64. On a machine without a GPU these
tests need ``TRITON_INTERPRET=1`` (the Triton interpreter runs the kernels
on CPU tensors); sizes are tiny to keep the interpreter fast.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the triton backend is untested")

from conftest import DEVICE, assert_close  # noqa: E402

if DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set: Triton cannot run here",
                allow_module_level=True)

import resfuse_kernels as rk  # noqa: E402
from resfuse_kernels.ops import composite  # noqa: E402
from resfuse_kernels.ops._common import STATS_DTYPE, compute_dtype, memory_format  # noqa: E402

tk = pytest.importorskip("resfuse_kernels.triton", reason="resfuse_kernels.triton cannot import")

LOW = (torch.float32, torch.bfloat16, torch.float16)
# (N, C, H) with H = W: odd channel counts, 1x1 to 5x5 images
SHAPES = [(2, 3, 1), (2, 3, 5), (2, 33, 3), (1, 100, 3)]


def _act(n, c, h, dtype, channels_last, shift=0.0):
    t = (torch.randn(n, c, h, h, dtype=torch.float64) + shift).to(dtype).to(DEVICE)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _bn(c, dtype=torch.float32):
    """(weight, bias, running_mean, running_var) with random non-trivial values."""
    weight = torch.randn(c, dtype=dtype, device=DEVICE)
    bias = torch.randn(c, dtype=dtype, device=DEVICE)
    mean = torch.randn(c, dtype=dtype, device=DEVICE)
    var = torch.rand(c, dtype=dtype, device=DEVICE) + 0.5
    return [weight, bias, mean, var]


def _f64(args):
    return [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in args]


def _check(got, expected, dtype, what, base):
    """Each result against the float64 oracle ``expected`` under the suite's
    one rule (conftest.RULE), ``base`` being the torch backend's results at
    the same precision: PyTorch's own error."""
    assert len(got) == len(expected) == len(base), what
    for i, (g, e, b) in enumerate(zip(got, expected, base)):
        assert_close(g, e, dtype, f"{what}[{i}]", b)


def _expected_dtypes(got, ref):
    """Dtypes and memory formats as composite's (run on the same, not upcast, inputs)."""
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype, (i, g.dtype, r.dtype)
        if g.dim() == 4:
            assert g.stride() == r.stride(), (i, "memory format", g.stride(), r.stride())


def _forward_dtypes(got, dtype, like):
    """y in the activations' dtype (the fake's rule), the statistics in STATS_DTYPE.

    (Not compared with composite's forward, which returns y in the compute dtype.)
    """
    assert got[0].dtype == dtype
    assert got[0].stride() == torch.empty_like(got[0], memory_format=memory_format(like)).stride()
    assert all(t.dtype == STATS_DTYPE for t in got[1:])


# --------------------------------------------------------------------------
# highway gate


def _highway_case(n, c, h, dtype, channels_last, training):
    a, b, x = (_act(n, c, h, dtype, channels_last) for _ in range(3))
    pdt = compute_dtype(dtype)  # parameters: float32, float64 with float64 activations
    return [a, b, x, *_bn(c, pdt), *_bn(c, pdt), training, 1e-5, 1e-3]


def _highway(args, dtype):
    got = tk.highway_gate_forward(*args)
    _forward_dtypes(got, dtype, args[0])
    ref = composite.highway_gate_forward(*_f64(args))
    _check(got, ref, dtype, "highway forward", composite.highway_gate_forward(*args))
    a = args[0]
    grad = _act(*a.shape[:3], dtype, not a.is_contiguous())
    mh, vh, mt, vt = ref[1:]  # float64, as the forward hands them
    bargs = [grad, *args[:3], args[3], args[4], mh, vh, args[7], args[8], mt, vt, *args[11:]]
    got = tk.highway_gate_backward(*bargs)
    base = composite.highway_gate_backward(*bargs)
    _expected_dtypes(got, base)
    _check(got, composite.highway_gate_backward(*_f64(bargs)), dtype, "highway backward", base)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_highway_gate(shape, channels_last, dtype, training):
    _highway(_highway_case(*shape, dtype, channels_last, training), dtype)


# --------------------------------------------------------------------------
# ResFuse tail


def _tail_case(n, k, h, dtype, channels_last, training, carry, cx=None, shift=0.0):
    u, hh = (_act(n, k, h, dtype, channels_last) for _ in range(2))
    pdt = compute_dtype(dtype)
    args = [u, hh, *_bn(k, pdt)]
    if carry:
        cx = cx or (k // 2 + 2)
        x = _act(n, cx, h, dtype, channels_last, shift)
        w = torch.randn(k, cx, 1, 1, dtype=pdt, device=DEVICE) / cx ** 0.5
        args += [x, w, *_bn(k, pdt)]
    else:
        args += [None] * 6
    return args + [training, 1e-5, 1e-3]


def _tail(args, dtype):
    got = tk.resfuse_tail_forward(*args)
    _forward_dtypes(got, dtype, args[0])
    ref = composite.resfuse_tail_forward(*_f64(args))
    _check(got, ref, dtype, "tail forward", composite.resfuse_tail_forward(*args))
    u = args[0]
    grad = _act(*u.shape[:3], dtype, not u.is_contiguous())
    md, vd, mk, vk = ref[1:]  # float64, as the forward hands them
    bargs = [grad, *args[:4], md, vd, *args[6:10], mk, vk, *args[12:]]
    got = tk.resfuse_tail_backward(*bargs)
    base = composite.resfuse_tail_backward(*bargs)
    _expected_dtypes(got, base)
    _check(got, composite.resfuse_tail_backward(*_f64(bargs)), dtype, "tail backward", base)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("carry", [False, True], ids=["plain", "carry"])
def test_resfuse_tail(carry, shape, channels_last, dtype, training):
    _tail(_tail_case(*shape, dtype, channels_last, training, carry), dtype)


# --------------------------------------------------------------------------
# wide channels, float64, large means, odd layouts, empty batches


@pytest.mark.parametrize("h", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_wide_channels(h, channels_last):
    """257 channels (a partial last block); BatchNorm over 2 or 8 values per
    channel, where the problem is ill-conditioned."""
    _highway(_highway_case(2, 257, h, torch.float32, channels_last, True), torch.float32)
    _tail(_tail_case(2, 257, h, torch.float32, channels_last, True, carry=True, cx=257),
          torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_float64(channels_last, training):
    """float64 stays float64 inside the kernels: the oracle's own precision."""
    _highway(_highway_case(2, 33, 3, torch.float64, channels_last, training), torch.float64)
    _tail(_tail_case(2, 33, 3, torch.float64, channels_last, training, carry=True),
          torch.float64)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_carry_stats_large_mean(channels_last):
    """BN_k's mean and variance of W x at a large mean of x: Welford moments of
    the shifted carry W (x - x0), accurate where a plain E[v^2] - E[v]^2 is not."""
    args = _tail_case(4, 33, 5, torch.float32, channels_last, True, carry=True, cx=40,
                      shift=100.0)
    # the forward (BN_k's statistics among its outputs), then the backward: dv's
    # rounding is amplified by |x| ~ 100 in dW for any float32 implementation
    got = tk.resfuse_tail_forward(*args)
    _check(got, composite.resfuse_tail_forward(*_f64(args)), torch.float32, "tail forward",
           composite.resfuse_tail_forward(*args))
    md, vd, mk, vk = got[1:]
    grad = _act(4, 33, 5, torch.float32, channels_last)
    bargs = [grad, *args[:4], md, vd, *args[6:10], mk, vk, *args[12:]]
    _check(tk.resfuse_tail_backward(*bargs), composite.resfuse_tail_backward(*_f64(bargs)),
           torch.float32, "tail backward", composite.resfuse_tail_backward(*bargs))
    # and the per-channel statistics of the highway gate
    a = _act(4, 33, 5, torch.float32, channels_last, shift=1000.0)
    b = _act(4, 33, 5, torch.float32, channels_last, shift=-300.0)
    args = [a, b, a.clone(), *_bn(33), *_bn(33), True, 1e-3, 0.1]
    _check(tk.highway_gate_forward(*args), composite.highway_gate_forward(*_f64(args)),
           torch.float32, "highway forward", composite.highway_gate_forward(*args))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_carry_shift_centres_only_offset_channels(channels_last):
    """The carry's shift x0: the mean of the first SHIFT_SAMPLE pixels
    (image-major), to 12 significant bits (so that x - x0 is exact), on
    channels whose mean exceeds their spread, exactly 0 on centred ones (a
    shift there would only add rounding to W x)."""
    from resfuse_kernels.triton import resfuse_tail as rt
    n, c, h = 3, 20, 7  # 147 pixels: more than the 128 sampled
    x = _act(n, c, h, torch.float32, channels_last)
    offset = torch.arange(c, device=DEVICE) % 2 == 1
    x = x + 50.0 * offset.view(1, c, 1, 1)  # odd channels far from 0, even ones centred
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
    x3, sx = tk._launch.view3(x)
    x0 = rt._carry_shift(x3, sx)
    sample = x.double().permute(0, 2, 3, 1).reshape(-1, c)[:rt.SHIFT_SAMPLE]
    # to 12 significant bits: the float32's half-way up, 12 low bits dropped
    bits = (sample.mean(0).float().view(torch.int32) + 0x800) & ~0xFFF
    expected = torch.where(offset, bits.view(torch.float32), 0.0)
    assert torch.equal(x0, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_many_chunks(monkeypatch, channels_last):
    """More partial rows than _stats_finalize reads in one tile (a GPU has
    4 per multiprocessor): the merged statistics and the whole op still
    match the oracle."""
    if tk.INTERPRET:
        monkeypatch.setattr(tk._launch, "INTERPRET_CHUNKS", 45)
    # 4 x cdiv(144, 16) = 36 tiles of 16 pixels: 36 non-empty partial rows
    args = _tail_case(4, 33, 12, torch.float32, channels_last, True, carry=True)
    _check(tk.resfuse_tail_forward(*args), composite.resfuse_tail_forward(*_f64(args)),
           torch.float32, "tail forward", composite.resfuse_tail_forward(*args))
    _highway(_highway_case(4, 33, 12, torch.float32, channels_last, True), torch.float32)


def test_mixed_and_strided_layouts():
    """Each activation is read through its own strides; a non-dense view is copied."""
    n, c, h = 2, 33, 4
    a = _act(n, c, h, torch.float32, True)
    b = _act(n, c, h, torch.float32, False)
    x = _act(n, c, 2 * h, torch.float32, False)[:, :, ::2, 1::2]  # not dense
    args = [a, b, x, *_bn(c), *_bn(c), True, 0.1, 1e-5]
    _highway(args, torch.float32)
    u = _act(n, c, h, torch.float32, False)
    hh = _act(n, c + 5, h, torch.float32, True)[:, 2:c + 2]  # dense in H, W; channel slice
    xc = _act(n, 7, 2 * h, torch.float32, True)[:, :, :h, :h]  # rows skip: not mergeable
    args = [u, hh, *_bn(c), xc, torch.randn(c, 7, device=DEVICE), *_bn(c), True, 1e-3, 0.1]
    _tail(args, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training):
    a = torch.empty(0, 5, 3, 3, device=DEVICE)
    got = tk.highway_gate_forward(a, a, a, *_bn(5), *_bn(5), training, 1e-5, 1e-5)
    ref = composite.highway_gate_forward(a, a, a, *_bn(5), *_bn(5), training, 1e-5, 1e-5)
    assert [t.shape for t in got] == [t.shape for t in ref]
    if training:
        assert all((t == 0).all() for t in got[1:])
    got = tk.resfuse_tail_forward(a, a, *_bn(5), None, None, None, None, None, None,
                                  training, 1e-5, 1e-5)
    assert got[0].shape == a.shape and got[3].shape == (0,) and got[4].shape == (0,)


# --------------------------------------------------------------------------
# through the registered ops: autograd and gradcheck


def test_ops_gradcheck_float64():
    """The whole Jacobian of both ops (training, with the carry), tiny: under
    the interpreter every column costs two launches. The contract suite's
    gradcheck at a larger size runs in fast mode there (tests/test_ops.py)."""
    with rk.backends.use("triton"):
        n, c, h = 1, 2, 2
        kw = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
        a, b, x = (torch.randn(n, c, h, h, **kw) for _ in range(3))
        ph = [torch.randn(c, **kw) for _ in range(4)]

        def gate(a, b, x, wh, bh, wt, bt):
            return rk.ops.highway_gate(a, b, x, wh, bh, None, None, wt, bt, None, None,
                                       training=True)

        assert torch.autograd.gradcheck(gate, (a, b, x, *ph))
        u, hh = (torch.randn(n, c, h, h, **kw) for _ in range(2))
        xc = torch.randn(n, 3, h, h, **kw)
        w = torch.randn(c, 3, **kw)

        def tail(u, hh, wd, bd, xc, w, wk, bk):
            return rk.ops.resfuse_tail(u, hh, wd, bd, None, None, xc, w, wk, bk, None, None,
                                       training=True)

        pt = [torch.randn(c, **kw) for _ in range(4)]
        assert torch.autograd.gradcheck(tail, (u, hh, pt[0], pt[1], xc, w, pt[2], pt[3]))


def test_ops_autograd_matches_torch_backend():
    """The registered op on the triton backend vs the torch backend, running stats too."""
    n, c, h = 2, 33, 3

    def run(backend, inputs):
        leaves = [t.clone().requires_grad_() for t in inputs[:8]]
        grad_ = grad.to(inputs[0].dtype)
        stats = [t.clone() for t in inputs[8:]]
        with rk.backends.use(backend):
            y = rk.ops.resfuse_tail(leaves[0], leaves[1], leaves[2], leaves[3], stats[0],
                                    stats[1], leaves[4], leaves[5], leaves[6], leaves[7],
                                    stats[2], stats[3], training=True, momentum_d=0.3,
                                    momentum_k=0.1, eps_d=1e-3, eps_k=0.1)
            y.backward(grad_)
        return [y, *stats, *(t.grad for t in leaves)]

    u, hh = (_act(n, c, h, torch.float32, True) for _ in range(2))
    xc = _act(n, 10, h, torch.float32, True)
    w = torch.randn(c, 10, 1, 1, device=DEVICE)
    bn_d, bn_k = _bn(c), _bn(c)
    grad = _act(n, c, h, torch.float32, True)
    inputs = [u, hh, bn_d[0], bn_d[1], xc, w, bn_k[0], bn_k[1], bn_d[2], bn_d[3],
              bn_k[2], bn_k[3]]
    oracle = run("torch", [t.double() for t in inputs])
    for i, (got, ref, base) in enumerate(zip(run("triton", inputs), oracle,
                                             run("torch", inputs))):
        assert_close(got, ref, torch.float32, f"output {i}", base)
