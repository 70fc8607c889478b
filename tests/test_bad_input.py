"""Bad input gets a clear error naming the argument, or the documented result."""

from __future__ import annotations

import copy

import pytest
import torch

import resfuse_kernels as rk
from _cases import HighwayCase, TailCase
from conftest import DEVICE


def _highway(case, **replace):
    h, t = case.bn_h, case.bn_t
    args = dict(a=case.a, b=case.b, x=case.x, weight_h=h.weight, bias_h=h.bias,
                running_mean_h=h.running_mean, running_var_h=h.running_var,
                weight_t=t.weight, bias_t=t.bias, running_mean_t=t.running_mean,
                running_var_t=t.running_var)
    training = replace.pop("training", case.training)
    args.update(replace)
    return rk.ops.highway_gate(**args, training=training)


def _tail(case, **replace):
    d, k = case.bn_d, case.bn_k
    args = dict(u=case.u, h=case.h, weight_d=d.weight, bias_d=d.bias,
                running_mean_d=d.running_mean, running_var_d=d.running_var,
                x=case.x, w=case.w, weight_k=k.weight, bias_k=k.bias,
                running_mean_k=k.running_mean, running_var_k=k.running_var)
    training = replace.pop("training", case.training)
    args.update(replace)
    return rk.ops.resfuse_tail(**args, training=training)


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
