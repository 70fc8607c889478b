"""Bad input gets a clear error naming the argument, or the documented result."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import resfuse_kernels as rk
from _cases import HighwayCase, TailCase
from conftest import DEVICE


def _highway(case, **replace):
    """rk.ops.highway_gate on ``case`` (its eps and momenta), arguments
    replaced by keyword."""
    h, t = case.bn_h, case.bn_t
    args = dict(a=case.a, b=case.b, x=case.x, weight_h=h.weight, bias_h=h.bias,
                running_mean_h=h.running_mean, running_var_h=h.running_var,
                weight_t=t.weight, bias_t=t.bias, running_mean_t=t.running_mean,
                running_var_t=t.running_var, training=case.training,
                momentum_h=h.op_momentum(), momentum_t=t.op_momentum(), eps_h=h.eps, eps_t=t.eps)
    args.update(replace)
    return rk.ops.highway_gate(**args)


def _tail(case, **replace):
    """rk.ops.resfuse_tail on ``case`` (with its carry), as :func:`_highway`."""
    d, k = case.bn_d, case.bn_k
    args = dict(u=case.u, h=case.h, weight_d=d.weight, bias_d=d.bias,
                running_mean_d=d.running_mean, running_var_d=d.running_var,
                x=case.x, w=case.w, weight_k=k.weight, bias_k=k.bias,
                running_mean_k=k.running_mean, running_var_k=k.running_var,
                training=case.training, momentum_d=d.op_momentum(),
                momentum_k=k.op_momentum(), eps_d=d.eps, eps_k=k.eps)
    args.update(replace)
    return rk.ops.resfuse_tail(**args)


@pytest.fixture
def hw():
    return HighwayCase.random((2, 4, 3, 3))


@pytest.fixture
def tail():
    return TailCase.random((2, 4, 3, 3), carry_channels=6)


@pytest.mark.parametrize("replace, error, match", [
    (lambda c: {"a": c.a[0]}, ValueError, r"a must be a 4-D \(N, C, H, W\) tensor"),
    (lambda c: {"b": c.b[:, :3]}, ValueError, r"b has shape \(2, 3, 3, 3\)"),
    (lambda c: {"x": torch.randint(0, 5, c.x.shape)}, TypeError, "x must be a floating-point"),
    (lambda c: {"x": c.x.double()}, TypeError, "x has dtype torch.float64"),
    (lambda c: {"x": c.x.to("meta")}, ValueError, "x is on meta"),
    (lambda c: {"weight_h": torch.ones(5)}, ValueError, r"weight_h must have shape \(4,\)"),
    (lambda c: {"bias_t": torch.ones(4, dtype=torch.int32)}, TypeError, "bias_t must be a float"),
    (lambda c: {"running_var_t": None, "training": False}, ValueError, "running_var_t is required"),
    (lambda c: {"a": [1.0]}, RuntimeError, "type 'Tensor' for argument 'a'"),
])
def test_highway_gate_rejects(backend, hw, replace, error, match):
    with pytest.raises(error, match=match):
        _highway(hw, **replace(hw))


@pytest.mark.parametrize("replace, error, match", [
    (lambda c: {"h": c.h.unsqueeze(0)}, ValueError, "h must be a 4-D"),
    (lambda c: {"u": c.u.long()}, TypeError, "u must be a floating-point"),
    (lambda c: {"x": c.x[:1]}, ValueError, "batch and spatial sizes must match"),
    (lambda c: {"w": c.w[:3]}, ValueError, r"w must be the 1x1 carry weight of shape \(4, 6\)"),
    (lambda c: {"w": c.w.new_ones(4, 6, 3, 3)}, ValueError, "w must be the 1x1 carry weight"),
    (lambda c: {"w": None}, ValueError, "the carry needs x, w, weight_k and bias_k together; w"),
    (lambda c: {"running_mean_k": c.w.new_zeros(3)}, ValueError, "running_mean_k must have shape"),
    (lambda c: {"weight_d": c.w.new_ones(4, 1)}, ValueError, "weight_d must have shape"),
])
def test_resfuse_tail_rejects(backend, tail, replace, error, match):
    with pytest.raises(error, match=match):
        _tail(tail, **replace(tail))


def test_one_value_per_channel_in_training(backend):
    case = HighwayCase.random((1, 4, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _highway(case)
    case = TailCase.random((1, 4, 1, 1), carry_channels=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _tail(case)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["highway", "resfuse"])
def test_empty_batch_behaves_like_reference(backend, kind, training):
    """An empty batch: empty output, zero parameter gradients and untouched
    running statistics (num_batches_tracked still counts), as nn.BatchNorm2d."""
    reference = (rk.nn.HighwayBlock(4) if kind == "highway" else rk.nn.ResFuseBlock(4))
    reference = reference.to(DEVICE).train(training)
    fused = rk.convert(copy.deepcopy(reference), fused=True)
    for model in (reference, fused):
        x = torch.randn(0, 4, 5, 5, device=DEVICE, requires_grad=True)
        y = model(x)
        assert y.shape == (0, 4, 5, 5)
        y.sum().backward()
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(reference.named_buffers(), fused.buffers()):
        assert torch.equal(b, c), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates_as_in_reference(backend, training):
    case = TailCase.random((2, 3, 4, 4), torch.float64, training=training, carry_channels=3)
    with torch.no_grad():
        case.u[0, 1, 2, 2] = float("nan")
        case.x[1, 0, 0, 3] = float("nan")
    want, _, _ = case.reference()
    got = _tail(case)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want.detach(), equal_nan=True)


def test_mixed_training_flags_in_one_block_are_rejected(backend):
    block = rk.nn.HighwayBlock(4, fused=True).to(DEVICE)
    block.bn_t.eval()
    with pytest.raises(ValueError, match="bn_h and bn_t must both"):
        block(torch.randn(2, 4, 3, 3, device=DEVICE))


# --------------------------------------------------------------------------
# Inf and NaN

NON_FINITE = [float("inf"), float("-inf"), float("nan")]


def _pattern(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t.isnan(), t == float("inf"), t == float("-inf")


@pytest.mark.parametrize("value", NON_FINITE, ids=["+inf", "-inf", "nan"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind, name", [("highway", "a"), ("highway", "b"), ("highway", "x"),
                                        ("resfuse", "u"), ("resfuse", "h"),
                                        ("resfuse", "x")])
def test_inf_and_nan_follow_pytorch(backend, kind, name, dtype, training, value):
    """One +Inf, -Inf or NaN in one activation input: the output is NaN, +Inf
    and -Inf exactly where PyTorch's (the reference: nn.BatchNorm2d, relu,
    sigmoid) is, at the same precision, and matches the float64 oracle
    elsewhere; so do the gradients' NaN and Inf; the running statistics are
    finite exactly where PyTorch's are.

    What PyTorch does: in training the value's channel gets a NaN batch
    variance (and a +-Inf or NaN mean), so the whole channel of that
    BatchNorm's output is NaN, and so is y's channel (the gate: T or H is
    NaN; the tail: z is; a non-finite x of the carry reaches every channel
    through W x, so all of y is NaN); the running variance turns NaN. In
    eval only the element is touched: BN(+-Inf) is +-Inf (sign times the
    weight's), relu(-Inf) = 0, sigmoid(+-Inf) = 1 or 0, NaN stays NaN; so
    Inf in ``a`` gives y = +Inf or x (H zero), in ``b`` y = H or x, in the
    gate's ``x`` y = +-Inf (1 - T > 0), in ``u``/``h`` y = +Inf or 0.
    (The cpu backend gave a finite channel equal to x for a NaN gate
    input: its fast exp dropped the NaN; the cpu and triton gates gave NaN
    for an infinite x, computing x + T (H - x); the cpu eval backward gave
    a NaN input gradient for an infinite input, from 0 * (z - mean).)

    One known difference in the gradients, left as the ops define it: for a
    NaN in ``b`` in eval, PyTorch's relu backward gives da = 0 where H is 0
    (whatever the incoming gradient g * T), where the ops' formula
    g * T * [H > 0] gives NaN (the composite's and so the triton and cuda
    backends'); da, dweight_h and dbias_h are not compared there.
    """
    shape = (2, 3, 6, 6)  # 72 values per channel; the bad one is the last
    if kind == "highway":
        case = HighwayCase.random(shape, dtype, training=training)
    else:
        case = TailCase.random(shape, dtype, training=training, carry_channels=4)
    with torch.no_grad():
        getattr(case, name)[1, 1, 5, 5] = value
    pytorch, pytorch_leaves, pytorch_bns = case.reference(dtype)
    oracle, _, _ = case.reference()
    got = case.run()
    grads = torch.autograd.grad(got.sum(), case.inputs())
    pytorch_grads = torch.autograd.grad(pytorch.sum(), pytorch_leaves)
    relu_mask = kind == "highway" and name == "b" and value != value and not training
    for i, (have_t, want_t) in enumerate(zip((got, *grads), (pytorch, *pytorch_grads))):
        if relu_mask and i - 1 in (0, 3, 4):
            continue
        what = "y" if i == 0 else f"gradient {i - 1}"
        for want, have, non_finite in zip(_pattern(want_t), _pattern(have_t),
                                          ("NaN", "+Inf", "-Inf")):
            assert torch.equal(have, want), f"{what}: {non_finite} at {have.nonzero().tolist()}, " \
                                            f"PyTorch's at {want.nonzero().tolist()}"
    got = got.detach()
    finite = got.isfinite()
    torch.testing.assert_close(got[finite].double(), oracle.detach()[finite],
                               rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-4)
    for ours, theirs in zip(case.bns(), pytorch_bns):
        for stat in ("running_mean", "running_var"):
            assert torch.equal(getattr(ours, stat).isfinite(),
                               getattr(theirs, stat).isfinite()), stat


# --------------------------------------------------------------------------
# meta tensors

def _on_meta(obj):
    """A copy of a case (or BN) whose tensors are meta tensors, requires_grad kept."""
    obj = copy.copy(obj)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, torch.Tensor):
            value = value.detach().to("meta").requires_grad_(value.requires_grad)
        elif dataclasses.is_dataclass(value):
            value = _on_meta(value)
        setattr(obj, field.name, value)
    return obj


def _like(meta: torch.Tensor, real: torch.Tensor, what: str) -> None:
    assert meta.device.type == "meta", what
    assert (meta.shape, meta.dtype, meta.stride()) == (real.shape, real.dtype, real.stride()), \
        f"{what}: {(meta.shape, meta.dtype, meta.stride())} != " \
        f"{(real.shape, real.dtype, real.stride())}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["highway", "resfuse"])
def test_ops_on_meta_tensors_infer_shapes(backend, kind, layout, training):
    """On meta tensors rk.ops.* give what they give on real ones (shape,
    dtype, strides; gradients too), as torch.ops.resfuse.* and PyTorch's own
    ops do, whatever backend is forced (autocast raised "unknown device type"
    for 'meta')."""
    shape = (2, 4, 3, 3)
    if kind == "highway":
        case, run = HighwayCase.random(shape, layout=layout, training=training), _highway
    else:
        case = TailCase.random(shape, layout=layout, training=training, carry_channels=6)
        run = _tail
    meta = _on_meta(case)
    real_y, meta_y = run(case), run(meta)
    _like(meta_y, real_y, "y")
    real_grads = torch.autograd.grad(real_y.sum(), case.inputs())
    meta_grads = torch.autograd.grad(meta_y.sum(), meta.inputs())
    for i, (m, r) in enumerate(zip(meta_grads, real_grads)):
        _like(m, r, f"gradient {i}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", [lambda: rk.nn.HighwayBlock(4),
                                  lambda: rk.nn.ResFuseBlock(4),
                                  lambda: rk.nn.BasicBlock(4, 8, stride=2),
                                  lambda: rk.nn.BasicBlock(4, 8, stride=2, shortcut="B")],
                         ids=["highway", "resfuse", "basic-A", "basic-B"])
def test_fused_blocks_on_meta_tensors(backend, make, training):
    """A fused block on the meta device gives what its reference twin gives
    there (PyTorch's own layers: same shape, dtype and strides) and the
    output shape of a real run; backward runs."""
    reference = make().to("meta").train(training)
    fused = rk.convert(copy.deepcopy(reference), fused=True)
    x = torch.empty(2, 4, 6, 6, device="meta", requires_grad=True)
    want = reference(x)
    got = fused(x)
    _like(got, want, "y")
    assert got.shape == make().train(training)(torch.randn(2, 4, 6, 6)).shape
    got.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------
# momentum

@pytest.mark.parametrize("kind, name", [("highway", "momentum_h"), ("highway", "momentum_t"),
                                        ("resfuse", "momentum_d"), ("resfuse", "momentum_k")])
def test_momentum_none_is_rejected_with_what_to_pass(backend, hw, tail, kind, name):
    """nn.BatchNorm2d's momentum=None is the cumulative average 1 /
    num_batches_tracked, a count the op does not keep: the op says so, and
    the value it asks for gives nn.BatchNorm2d's running statistics."""
    case, run = (hw, _highway) if kind == "highway" else (tail, _tail)
    case.training = True
    with pytest.raises(ValueError, match=rf"{name}=None .* {name}=1 / num_batches_tracked"):
        run(case, **{name: None})
    which = 0 if name[-1] in "hd" else -1  # this momentum's BatchNorm
    bn = case.bns()[which]
    bn.momentum, bn.batches_tracked = None, 2
    module = case.reference()[2][which]
    run(case, **{name: torch.tensor(1 / 3, dtype=torch.float64)})
    for stat in ("running_mean", "running_var"):  # float32 against float64
        torch.testing.assert_close(getattr(bn, stat).double(), getattr(module, stat),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum, shown", [
    ("0.1", "str '0.1'"),
    (torch.tensor([0.1]), "a 1-D torch.float32 tensor"),
    (torch.tensor(1), "a 0-D torch.int64 tensor"),
])
def test_momentum_must_be_a_number(backend, hw, tail, momentum, shown):
    for run, case, name in ((_highway, hw, "momentum_t"), (_tail, tail, "momentum_k")):
        with pytest.raises(TypeError, match=rf"{name} must be a float .* got {shown}"):
            run(case, **{name: momentum})


# --------------------------------------------------------------------------
# BatchNorm parameter dtypes

def _pytorch_accepts(activation: torch.Tensor, bn) -> bool:
    """Whether torch.nn.functional.batch_norm (on CPU) takes these dtypes."""
    cpu = [t.detach().cpu() for t in (activation, bn.running_mean, bn.running_var,
                                      bn.weight, bn.bias)]
    try:
        torch.nn.functional.batch_norm(cpu[0], *cpu[1:], training=True)
    except RuntimeError:
        return False
    return True


F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", [("weight", "bias", "running_mean", "running_var"),
                                   ("weight",), ("running_var",)],
                         ids=["all", "weight", "running_var"])
@pytest.mark.parametrize("activations, params", [
    (F32, F64), (F32, BF16), (F64, F32), (BF16, F32), (BF16, BF16), (BF16, F64), (F16, F32),
    (F16, BF16),
], ids=lambda d: str(d).removeprefix("torch."))
def test_batch_norm_parameter_dtypes_follow_pytorch(backend, activations, params, which,
                                                    training):
    """F.batch_norm's rule (CPU): weight, bias, running_mean and running_var
    share one dtype, the activations' or, for bfloat16/float16 activations,
    float32 (modules keep fp32 parameters under autocast). So float32
    activations with float64 (or bf16) parameters raise ("mixed dtype (CPU):
    expect parameter to have scalar type of Float", or "expected scalar type
    Float but found Double" for the bias or running statistics alone),
    float64 activations with float32 parameters raise ("all inputs must
    share same datatype"), bf16 with fp32 (all four) is accepted, bf16 with
    bf16 is, bf16 with a mix of bf16 and fp32 is not. The ops raise a
    TypeError naming the argument where PyTorch raises, and compute the
    reference's result where it accepts.

    Each case turns BN_h's (the gate's) or BN_d's (the tail's) ``which`` to
    ``params``; the other BatchNorm and the rest keep the dtype a module
    would have (fp32, fp64 for fp64 activations).
    """
    for kind in ("highway", "resfuse"):
        if kind == "highway":
            case = HighwayCase.random((2, 4, 3, 3), activations, training=training)
            run, first, bn = _highway, case.a, case.bn_h
        else:
            case = TailCase.random((2, 4, 3, 3), activations, training=training,
                                   carry_channels=6)
            run, first, bn = _tail, case.u, case.bn_d
        for field in which:
            setattr(bn, field, getattr(bn, field).detach().to(params))
        suffix = "h" if kind == "highway" else "d"
        if not _pytorch_accepts(first, bn):
            with pytest.raises(TypeError, match=rf"(weight|bias|running_mean|running_var)_"
                                                rf"{suffix} has dtype"):
                run(case)
            continue
        got = run(case)
        assert got.dtype == activations
        oracle, _, _ = case.reference()
        tolerance = {F64: 1e-9, F32: 1e-4, BF16: 6e-2, F16: 1e-2}[activations]
        torch.testing.assert_close(got.double(), oracle.detach(), rtol=tolerance,
                                   atol=tolerance)


# --------------------------------------------------------------------------
# rk.convert

@pytest.mark.parametrize("model", ["str", None, [rk.nn.HighwayBlock(4)]],
                         ids=["str", "None", "list"])
def test_convert_takes_a_module(model):
    with pytest.raises(TypeError, match=r"convert takes an nn.Module .*got "
                                        rf"{type(model).__name__}"):
        rk.convert(model)
