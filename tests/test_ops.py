"""The fused ops against the float64 oracle (resfuse_kernels.reference).

Every test takes the ``backend`` fixture, so it runs once per backend usable
on the test device. Each compares forward output, every gradient and the
running statistics with the reference formula on fresh random data.
"""

from __future__ import annotations

import pytest
import torch

import resfuse_kernels as rk
from _cases import FAR_STRIDE, HighwayCase, TailCase, far_apart, steps_from_one_state
from conftest import BACKENDS, DEVICE, assert_close, error_bound, interpreted, sized

# Odd sizes: 3, 33 and 100 channels; 1x1, 5x5, 7x7 and 33x33 images; batch 1
# (the last, smaller under the Triton interpreter: conftest.INTERPRETER_SHAPES).
SHAPES = [(2, 3, 5, 5), (1, 33, 7, 7), (3, 100, 1, 1), (2, 4, 33, 33)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def loss_grad(case, y_ref: torch.Tensor, y_pytorch: torch.Tensor, dtype) -> torch.Tensor:
    """A random gradient of y, zero where the oracle's ReLU input lies within
    the output's allowed error of 0 (conftest.py: ReLU's kink)."""
    gy = torch.randn(y_ref.shape, device=y_ref.device, dtype=torch.float32)
    return gy.masked_fill_(case.near_kink(error_bound(y_ref, y_pytorch, dtype)), 0.0)


def _check_against_oracle(case, dtype, first):
    """Output, every gradient and the running statistics against the float64
    oracle, under conftest.RULE: PyTorch's own error is that of the
    reference formula run with the activations stored in ``dtype``, on the
    same inputs, from the same running statistics."""
    low, low_inputs, low_bns = case.reference(dtype)  # both from the running
    y_ref, ref_inputs, ref_bns = case.reference()     # statistics before the op's
    y = case.run()
    assert y.dtype == dtype and y.shape == first.shape
    if first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = loss_grad(case, y_ref, low, dtype)
    grads = torch.autograd.grad(y, case.inputs(), gy.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, gy.to(torch.float64))
    low_grads = torch.autograd.grad(low, low_inputs, gy.to(dtype))
    assert_close(y, y_ref, dtype, "y", low)
    for index, (g, r, p) in enumerate(zip(grads, ref_grads, low_grads)):
        assert_close(g, r, dtype, f"gradient of input {index}", p)
    for bn, ref, pt in zip(case.bns(), ref_bns, low_bns):
        # the running statistics are float32 whatever the activations' dtype
        stats_dtype = bn.running_mean.dtype
        assert_close(bn.running_mean, ref.running_mean, stats_dtype, "running_mean",
                     pt.running_mean)
        assert_close(bn.running_var, ref.running_var, stats_dtype, "running_var",
                     pt.running_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_highway_gate_matches_oracle(backend, shape, layout, training):
    shape = sized(shape, backend)
    case = HighwayCase.random(shape, torch.float32, layout, training)
    _check_against_oracle(case, torch.float32, case.a)


@pytest.mark.parametrize("carry", [None, "same", "wider"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_resfuse_tail_matches_oracle(backend, shape, layout, training, carry):
    shape = sized(shape, backend)
    channels = {None: None, "same": shape[1], "wider": shape[1] + 5}[carry]
    case = TailCase.random(shape, torch.float32, layout, training, carry_channels=channels)
    _check_against_oracle(case, torch.float32, case.u)


def test_resfuse_tail_carry_stats_at_large_means(backend):
    """BN_k's statistics stay accurate when x has a mean far from zero: the
    error stays within conftest.RULE of PyTorch's fp32 reference (a naive
    E[v^2] - E[v]^2 in fp32 would lose every digit here)."""
    case = TailCase.random((4, 16, 6, 6), torch.float32, "nchw", True, carry_channels=24,
                           x_mean=300.0)
    _check_against_oracle(case, torch.float32, case.inputs()[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_stats_when_the_first_values_are_outliers(backend, layout):
    """The batch statistics stay accurate when every channel's first value
    lies 12 standard deviations out (a kernel that took its sums of squares
    around that value would lose ~140x its precision to cancellation)."""
    shape = (4, 9, 5, 6)
    for case, firsts in [(HighwayCase.random(shape, layout=layout), ("a", "b")),
                         (TailCase.random(shape, layout=layout, carry_channels=7), ("u",))]:
        with torch.no_grad():
            for name in firsts:
                getattr(case, name)[0, :, 0, 0] = 12.0
        _check_against_oracle(case, torch.float32, case.inputs()[0])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_offsets_past_two_to_the_31(backend, layout, training):
    """Activations whose elements lie up to 2**31 + 200 apart (the images
    FAR_STRIDE apart in a sparse buffer): every offset that a kernel forms
    must be 64-bit. In the Triton interpreter, as on a GPU, int32 products
    wrap, so a missing int64 cast reads or writes the wrong element."""
    shape = (3, 5, 3, 3)
    case = HighwayCase.random(shape, torch.float32, "nchw", training)
    case.a, case.b, case.x = far_apart([case.a, case.b, case.x], layout)
    assert case.a.storage_offset() + 2 * FAR_STRIDE >= 2 ** 31
    _check_against_oracle(case, torch.float32, case.a)
    case = TailCase.random(shape, torch.float32, "nchw", training, carry_channels=7)
    case.u, case.h = far_apart([case.u, case.h], layout)
    (case.x,) = far_apart([case.x], layout)
    _check_against_oracle(case, torch.float32, case.u)


def _momenta_as(tensor: bool):
    """A run for :func:`steps_from_one_state`: the public op with each
    BatchNorm's own momentum as a float or as a 0-dim tensor (what
    ``momentum=None``'s cumulative average passes)."""
    def run(case):
        for bn in case.bns():
            momentum = float(bn.op_momentum())
            bn.momentum = torch.tensor(momentum, device=DEVICE) if tensor else momentum
        return case.run()
    return run


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float_and_tensor_momenta_agree(backend, training):
    """The running update takes a float momentum in one foreach lerp and a
    tensor one lerp by lerp: same output, gradients and running statistics,
    bit for bit, with strides."""
    cases = [HighwayCase.random((2, 5, 3, 4), torch.float32, "channels_last", training),
             TailCase.random((2, 5, 3, 4), torch.float32, "nchw", training),
             TailCase.random((2, 5, 3, 4), torch.float32, "channels_last", training,
                             carry_channels=7)]
    for case in cases:
        floats, tensors = steps_from_one_state(
            case, [_momenta_as(tensor=False), _momenta_as(tensor=True)])
        for index, (f, t) in enumerate(zip(floats, tensors)):
            assert torch.equal(f, t), (type(case).__name__, index)
            assert f.stride() == t.stride(), (type(case).__name__, index)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend cannot run on this device")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_backend_on_several_threads(layout):
    """The CPU backend splits its reductions into a chunk per thread and
    merges them; the suite's workers run on one thread each (conftest.py),
    so here three threads split them, training and eval, with the carry."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with rk.backends.use("cpu"):
            for training in (True, False):
                case = HighwayCase.random((2, 33, 7, 7), torch.float32, layout, training)
                _check_against_oracle(case, torch.float32, case.a)
                for channels in (None, 40):
                    case = TailCase.random((2, 33, 7, 7), torch.float32, layout, training,
                                           carry_channels=channels)
                    _check_against_oracle(case, torch.float32, case.u)
    finally:
        torch.set_num_threads(threads)


def test_eval_with_one_value_per_channel(backend):
    """Batch 1, 1x1 images: legal in eval (running statistics)."""
    _check_against_oracle(HighwayCase.random((1, 3, 1, 1), training=False), torch.float32,
                          torch.empty(1, 3, 1, 1))
    case = TailCase.random((1, 3, 1, 1), training=False, carry_channels=3)
    _check_against_oracle(case, torch.float32, case.u)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", ["highway", "tail"])
def test_low_precision_error_at_most_twice_pytorchs(backend, op, dtype, layout):
    shape = (2, 33, 7, 7)
    if op == "highway":
        case = HighwayCase.random(shape, dtype, layout, True)
    else:
        case = TailCase.random(shape, dtype, layout, True, carry_channels=40)
    _check_against_oracle(case, dtype, case.inputs()[0])


# --------------------------------------------------------------------------
# gradcheck, opcheck, autocast

def _gradcheck_highway(case):
    h, t = case.bn_h, case.bn_t

    def fn(a, b, x, weight_h, bias_h, weight_t, bias_t):
        return rk.ops.highway_gate(a, b, x, weight_h, bias_h, h.running_mean, h.running_var,
                                   weight_t, bias_t, t.running_mean, t.running_var,
                                   training=case.training, momentum_h=0.0, momentum_t=0.0,
                                   eps_h=h.eps, eps_t=t.eps)
    return fn


def _gradcheck_tail(case):
    d, k = case.bn_d, case.bn_k

    def fn(u, h, weight_d, bias_d, *carry):
        extra = () if not carry else (carry[0], carry[1], carry[2], carry[3],
                                      k.running_mean, k.running_var)
        return rk.ops.resfuse_tail(u, h, weight_d, bias_d, d.running_mean, d.running_var,
                                   *extra, training=case.training, momentum_d=0.0,
                                   momentum_k=0.0, eps_d=d.eps, eps_k=1e-5 if k is None else k.eps)
    return fn


def _gradcheck(fn, inputs, backend: str) -> bool:
    """The whole Jacobian, except under the Triton interpreter: there each of
    its ~200-500 columns costs two Python runs of a kernel (60-120 s a test),
    so it checks a random projection v^T J u instead (fast mode: any wrong
    gradient entry above ~1e-3 moves it past the tolerance), and
    tests/test_triton_kernels.py checks Triton's whole Jacobian at a tiny size."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted(backend))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_highway_gate(backend, training, layout):
    case = HighwayCase.random((2, 3, 3, 3), torch.float64, layout, training)
    assert _gradcheck(_gradcheck_highway(case), case.inputs(), backend)


@pytest.mark.parametrize("carry", [False, True], ids=["no-carry", "carry"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_resfuse_tail(backend, training, carry):
    case = TailCase.random((2, 3, 3, 3), torch.float64, "nchw", training,
                           carry_channels=4 if carry else None)
    assert _gradcheck(_gradcheck_tail(case), case.inputs(), backend)


def _highway_op_args(case):
    h, t = case.bn_h, case.bn_t
    return (case.a, case.b, case.x, *h.args(), *t.args(), case.training, h.eps, t.eps)


def _tail_op_args(case):
    d, k = case.bn_d, case.bn_k
    carry = (None,) * 6 if k is None else (case.x, case.w, *k.args())
    return (case.u, case.h, *d.args(), *carry, case.training, d.eps,
            1e-5 if k is None else k.eps)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_highway_gate(backend, training, layout):
    case = HighwayCase.random((2, 5, 3, 3), torch.float32, layout, training)
    args = _highway_op_args(case)
    torch.library.opcheck(torch.ops.resfuse.highway_gate.default, args)
    y, *stats = torch.ops.resfuse.highway_gate(*args)
    grad_args = (torch.randn_like(y), case.a, case.b, case.x, case.bn_h.weight, case.bn_h.bias,
                 stats[0], stats[1], case.bn_t.weight, case.bn_t.bias, stats[2], stats[3],
                 training, case.bn_h.eps, case.bn_t.eps)
    torch.library.opcheck(torch.ops.resfuse.highway_gate_backward.default,
                          [t.detach() if isinstance(t, torch.Tensor) else t for t in grad_args])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("carry", [False, True], ids=["no-carry", "carry"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_resfuse_tail(backend, training, carry, layout):
    case = TailCase.random((2, 5, 3, 3), torch.float32, layout, training,
                           carry_channels=6 if carry else None)
    args = _tail_op_args(case)
    torch.library.opcheck(torch.ops.resfuse.resfuse_tail.default, args)
    y, mean_d, var_d, mean_k, var_k = torch.ops.resfuse.resfuse_tail(*args)
    d, k = case.bn_d, case.bn_k
    grad_args = (torch.randn_like(y), case.u, case.h, d.weight, d.bias, mean_d, var_d,
                 case.x, case.w, None if k is None else k.weight, None if k is None else k.bias,
                 mean_k, var_k, training, *args[-2:])
    torch.library.opcheck(torch.ops.resfuse.resfuse_tail_backward.default,
                          [t.detach() if isinstance(t, torch.Tensor) else t for t in grad_args])


def test_zero_stride_output_gradient(backend):
    """y.sum() gives backward an expanded (stride 0) gradient."""
    case = TailCase.random((2, 6, 4, 4), torch.float32, "channels_last", True, carry_channels=6)
    y_ref, ref_inputs, _ = case.reference()
    y_pt, pt_inputs, _ = case.reference(torch.float32)
    grads = torch.autograd.grad(case.run().sum(), case.inputs())
    ref_grads = torch.autograd.grad(y_ref.sum(), ref_inputs)
    pt_grads = torch.autograd.grad(y_pt.sum(), pt_inputs)
    for index, (g, r, p) in enumerate(zip(grads, ref_grads, pt_grads)):
        assert_close(g, r, torch.float32, f"gradient of input {index}", p)


class _NoGradient(torch.autograd.Function):
    """Identity whose backward returns an undefined gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("op", ["highway", "tail"])
def test_undefined_output_gradient_gives_zero_gradients(backend, op):
    """The ops do not materialise gradients (their statistics never have one),
    so an undefined gradient of y reaches backward as None: every input
    gradient is then zero, as for the reference."""
    case = (HighwayCase.random((2, 5, 3, 3)) if op == "highway"
            else TailCase.random((2, 5, 3, 3), carry_channels=4))
    y = case.run()
    first = case.inputs()[0]
    grads = torch.autograd.grad(_NoGradient.apply(y).sum() + first.sum(), case.inputs())
    assert torch.equal(grads[0], torch.ones_like(first))
    for index, g in enumerate(grads[1:], 1):
        assert torch.equal(g, torch.zeros_like(g)), f"gradient of input {index}"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU autocast (the GPU run covers cuda)")
def test_autocast_promotes_mixed_activations(backend):
    """Under autocast, bf16 conv outputs meet an fp32 identity: the op
    promotes, as the reference's add does, instead of failing."""
    case = TailCase.random((2, 8, 5, 5), torch.float32, "nchw", True)
    u_low = case.u.detach().bfloat16().requires_grad_()
    case.u = u_low.detach().float()  # what the promotion makes of it
    y_ref, y_pt = case.reference()[0], case.reference(torch.float32)[0]
    d = case.bn_d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rk.ops.resfuse_tail(u_low, case.h, *d.args(), training=True, eps_d=d.eps,
                                momentum_d=d.op_momentum())
    assert y.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "y", y_pt)
    with pytest.raises(TypeError, match="autocast"):
        rk.ops.resfuse_tail(u_low, case.h, *d.args(), training=True)
