"""The networks and blocks: Table 3 counts, checkpoint twins, fused == reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resfuse_kernels as rk
from _cases import lay_out, train_against_oracle as _compare_training
from conftest import BACKENDS, DEVICE, RULE, interpreted, sized

MODELS = ["resnet19", "highway19", "resfuse19", "resnet25", "resfuse25", "resnet34"]


@pytest.mark.parametrize("name, expected", [
    ("resnet19", 4_235_172),    # the paper's Table 3
    ("highway19", 4_235_172),   # the paper's Table 3
    ("resfuse19", 4_322_084),   # the paper's Table 3
    ("resnet25", 5_785_252),    # our configuration (models/configs.py)
    ("resfuse25", 5_872_164),   # our configuration (models/configs.py)
])
def test_parameter_counts_100_classes(name, expected):
    model = getattr(rk.models, name)(num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet34_is_the_classical_one():
    model = rk.models.resnet34(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 21_797_672  # torchvision's count
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resfuse_adds_exactly_the_carries():
    """ResFuse-N = ResNet-N + a 1x1 conv (c*c) and its BN (2c) per stage."""
    carries = sum(c * c + 2 * c for c in (64, 128, 256))
    for fuse, plain in (("resfuse19", "resnet19"), ("resfuse25", "resnet25")):
        counts = [sum(p.numel() for p in rk.models.build(n).parameters()) for n in (fuse, plain)]
        assert counts[0] - counts[1] == carries


@pytest.mark.parametrize("name", MODELS)
def test_fused_and_reference_are_checkpoint_twins(name):
    reference = rk.models.build(name, num_classes=10)
    fused = rk.models.build(name, num_classes=10, fused=True)
    ref_state, fused_state = reference.state_dict(), fused.state_dict()
    assert list(ref_state) == list(fused_state)
    assert all(ref_state[k].shape == fused_state[k].shape for k in ref_state)
    fused.load_state_dict(ref_state, strict=True)
    assert all(torch.equal(ref_state[k], fused.state_dict()[k]) for k in ref_state)
    assert [n for n, _ in reference.named_buffers()] == [n for n, _ in fused.named_buffers()]


def test_convert_switches_every_block_in_place():
    model = rk.models.resfuse19(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert rk.convert(model, fused=True) is model
    blocks = [m for m in model.modules() if isinstance(m, rk.nn.FusableBlock)]
    assert blocks and all(m.fused for m in blocks)
    rk.convert(model, fused=False)
    assert not any(m.fused for m in blocks)
    after = model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)


def _model_cases(names: list[str], interpreted_names: list[str]) -> list:
    """(backend, network) pairs: under the Triton interpreter, where a whole
    network costs 40-80 s, only ``interpreted_names``."""
    return [pytest.param(b, n, id=f"{b}-{n}") for b in BACKENDS for n in names
            if not interpreted(b) or n in interpreted_names]


# Under the interpreter Highway-19 and ResFuse-19 hold every fused block kind
# between them (gate; tail with and without the carry, with and without
# downsampling), each also tested on its own below; ResNet-19's and
# ResFuse-25's blocks are the same kinds.
@pytest.mark.parametrize("backend, name",
                         _model_cases(["resnet19", "highway19", "resfuse19", "resfuse25"],
                                      ["highway19", "resfuse19"]),
                         indirect=["backend"])
def test_fused_model_trains_like_reference(backend, name):
    oracle = rk.models.build(name, num_classes=7).to(DEVICE, torch.float64)
    _compare_training(oracle, lambda: torch.randn(2, 3, 9, 9, device=DEVICE,
                                                  dtype=torch.float64))


def _block(kind: str, channels: int) -> nn.Module:
    if kind == "basic":
        return rk.nn.BasicBlock(channels, channels)
    if kind == "basic-down":
        return rk.nn.BasicBlock(channels, channels + 5, stride=2)
    if kind == "basic-down-B":
        return rk.nn.BasicBlock(channels, channels + 5, stride=2, shortcut="B")
    if kind == "highway":
        return rk.nn.HighwayBlock(channels, gate_bias=-1.0)
    return rk.nn.ResFuseBlock(channels)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 33, 5, 5), (4, 100, 1, 1)], ids=str)
@pytest.mark.parametrize("kind", ["basic", "basic-down", "basic-down-B", "highway", "resfuse"])
def test_fused_block_trains_like_reference(backend, kind, shape, layout):
    shape = sized(shape, backend)
    oracle = _block(kind, shape[1]).to(DEVICE, torch.float64)
    _randomise_batch_norms(oracle)
    _compare_training(oracle, lambda: lay_out(
        torch.randn(shape, device=DEVICE, dtype=torch.float64), layout))


def _randomise_batch_norms(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("kind", ["highway", "resfuse"])
def test_momentum_none_cumulative_average(backend, kind):
    """momentum=None: running stats are the cumulative average, as nn.BatchNorm2d's."""
    oracle = _block(kind, 6).to(DEVICE, torch.float64)
    for m in oracle.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    fused = _compare_training(oracle, lambda: torch.randn(3, 6, 4, 4, device=DEVICE,
                                                          dtype=torch.float64), steps=4)
    assert all(int(m.num_batches_tracked) == 4 for m in fused.modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU autocast (the GPU run covers cuda)")
# Under the interpreter ResFuse-19 (both tails) only: the gate's bf16 error
# is held to 2x PyTorch's by tests/test_ops.py there, and the autocast code
# path is the backends' common one.
@pytest.mark.parametrize("backend, name",
                         _model_cases(["highway19", "resfuse19"], ["resfuse19"]),
                         indirect=["backend"])
def test_fused_model_under_bf16_autocast(backend, name):
    """Under bf16 autocast the fused model errs at most K times what the
    reference model errs at bf16 (conftest.RULE), output and the whole gradient,
    both against the reference model run in float64.

    One draw is too noisy to judge: at this size bf16 rounding is amplified
    through 19 layers, and the fused/reference ratio of the two errors ranged
    over 0.35-1.8 in 50 draws (either model above), once 2.2 in CI. The
    errors are therefore averaged over four independent draws (weights,
    statistics, input): the ratio then ranged over 0.64-1.19 in those 50
    draws' 12 groups of four, while a wrong kernel errs by far more than 2x."""
    errors = torch.zeros(2, 2, dtype=torch.float64)   # (reference, fused) x (out, grad)
    for _ in range(4):
        reference = rk.models.build(name, num_classes=5).to(DEVICE)
        _randomise_batch_norms(reference)
        fused = rk.convert(copy.deepcopy(reference), fused=True)
        oracle = copy.deepcopy(reference).double()
        x = torch.randn(2, 3, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
        out64 = oracle(x.double())
        out64.square().mean().backward()
        grad64 = torch.cat([p.grad.flatten() for p in oracle.parameters()])
        for i, model in enumerate((reference, fused)):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                out = model(x)
            out.float().square().mean().backward()
            grad = torch.cat([p.grad.flatten().double() for p in model.parameters()])
            errors[i, 0] += ((out.detach().double() - out64.detach()).norm() / out64.norm()).item()
            errors[i, 1] += ((grad - grad64).norm() / grad64.norm()).item()
    (ref_out, ref_grad), (fused_out, fused_grad) = errors / 4
    # RULE's K for bf16; its ULPS term (two bf16 ulps, 1.6 % here) would
    # dwarf the reference's own ~1 % relative error of the output
    k, _ = RULE[torch.bfloat16]
    assert fused_out <= k * ref_out and fused_grad <= k * ref_grad, errors / 4
