"""rk.convert on other people's models: what it fuses, what it reports, twins.

The twins (float64, conftest.RULE: 2**20 ulps of the scale, 2.3e-10 at
scale 1, finer than the issue's 1e-9) compare a converted model with the
original over three NAG steps, outputs, every gradient and every buffer,
then in eval: torchvision-style ResNet-18/50 (resfuse_kernels/bench/
tv_resnet.py, written as torchvision writes them) and MONAI's, each through
the fx rewrite and the structural fallback, and a network per BatchNorm2d
configuration. Widths 4 to 32, batch 2: a twin takes seconds.

Two choices keep float64's rounding from growing past the rule, in the
reference as much as in the fused model (the torch backend, PyTorch's own
ops, erred as the cpu one; fx and structural agree bitwise):
* inputs 64x64 for the torchvision-style nets (they divide by 32; at 32x32
  the last BatchNorms see 2 values a channel), 32x32 for MONAI's (by 16);
* the bottlenecks' last BatchNorm weights scaled by 0.3 (torchvision's
  zero_init_residual, softened): with weights near 1, training 16 random
  bottlenecks is chaotic and a 1e-13 difference grew 100x a step (3e-9
  after two); at 0.3 the twins agree to 1e-13 after four.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfuse_kernels as rk
from resfuse_kernels.bench import tv_resnet
from _cases import train_against_oracle
from conftest import DEVICE, interpreted



def _input(size: int = 64):
    return lambda: torch.randn(2, 3, size, size, device=DEVICE, dtype=torch.float64)


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every BatchNorm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3)
                if m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        for name, m in model.named_modules():
            if name.endswith("bn3") and m.weight is not None:  # see the module's docstring
                m.weight.mul_(0.3)
    return model


def _monai(depth: int) -> nn.Module:
    nets = pytest.importorskip(
        "monai.networks.nets",
        reason="MONAI is not installed (make venv installs it: pip install --no-deps monai)")
    block, layers = {18: ("basic", [2, 2, 2, 2]), 50: ("bottleneck", [3, 4, 6, 3])}[depth]
    return nets.ResNet(block, layers, block_inplanes=[4, 8, 16, 32], spatial_dims=2,
                       n_input_channels=3, num_classes=5)


MODELS = {
    "tv-resnet18": lambda: tv_resnet.resnet18(num_classes=5, width=4),
    "tv-resnet50": lambda: tv_resnet.resnet50(num_classes=5, width=4),
    "monai-resnet18": lambda: _monai(18),
    "monai-resnet50": lambda: _monai(50),
}
BLOCKS = {"tv-resnet18": 8, "tv-resnet50": 16, "monai-resnet18": 8, "monai-resnet50": 16}


def _convert(method: str, bn_relu: bool = False, expect: int | None = None):
    def run(model):
        model, report = rk.convert(model, method=method, bn_relu=bn_relu, return_report=True)
        if expect is not None:
            assert len(report.fused) == expect, report
        return model
    return run


def _cases():
    for name in MODELS:
        for method in ("fx", "structural"):
            yield pytest.param(name, method, False, id=f"{name}-{method}")
    yield pytest.param("tv-resnet18", "fx", True, id="tv-resnet18-fx-bn_relu")


@pytest.mark.parametrize("name, method, bn_relu", _cases())
def test_converted_model_trains_like_original(backend, name, method, bn_relu):
    if interpreted(backend) and (name, method, bn_relu) != ("tv-resnet18", "fx", False):
        pytest.skip("the Triton interpreter runs one case (tv-resnet18, fx); the rest: torch, cpu")
    oracle = _randomise(MODELS[name]().to(DEVICE, torch.float64))
    # bn_relu adds the stem's and every block's inner bn -> relu
    expect = BLOCKS[name] + (9 if bn_relu else 0)
    size = 32 if name.startswith("monai") else 64
    fused = train_against_oracle(oracle, _input(size), convert=_convert(method, bn_relu, expect))
    converted = [m for m in fused.modules() if "_resfuse_converted" in m.__dict__]
    assert len(converted) == BLOCKS[name] + (1 if bn_relu else 0)  # + the stem's model


def test_auto_fuses_every_block_of_both_families():
    for name, blocks in BLOCKS.items():
        model = MODELS[name]()
        _, report = rk.convert(model, return_report=True)
        tails = [f for f in report.fused if f.pattern == "bn -> add -> relu"]
        assert len(tails) == blocks and all(f.method == "fx" for f in tails), report
        bn = "bn3" if "50" in name else "bn2"
        assert {f.bn for f in tails} == {p for p, _ in model.named_modules() if p.endswith(bn)
                                         and p.startswith("layer")}


# -- every BatchNorm2d configuration ------------------------------------------

CONFIGS = {
    "eps1e-3-momentum0.3": dict(eps=1e-3, momentum=0.3),
    "momentum-None": dict(momentum=None),
    "affine-False": dict(affine=False),
    "bias-False": dict(bias=False),
    "no-running-stats": dict(track_running_stats=False),
    "all-but-affine": dict(eps=0.1, momentum=None, bias=False),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_batch_norm_configurations_fuse_exactly(backend, config):
    kwargs = CONFIGS[config]
    if "bias" in kwargs and "bias" not in inspect.signature(nn.BatchNorm2d).parameters:
        pytest.skip(f"this torch ({torch.__version__}) has no BatchNorm2d(bias=False)")
    if interpreted(backend):
        pytest.skip("the Triton interpreter: a network takes a minute; test_ops.py covers "
                    "every configuration's arguments on it")
    norm = functools.partial(nn.BatchNorm2d, **kwargs)
    oracle = _randomise(tv_resnet.resnet18(num_classes=5, width=4, norm_layer=norm)
                        .to(DEVICE, torch.float64))
    fused = train_against_oracle(oracle, _input(), steps=4,
                                 convert=_convert("auto", bn_relu=True, expect=17))
    if kwargs.get("momentum", 0.1) is None and kwargs.get("track_running_stats", True):
        assert all(int(m.num_batches_tracked) == 4 for m in fused.modules()
                   if isinstance(m, nn.BatchNorm2d))


def test_blocks_name_what_they_need_for_affine_false():
    block = rk.nn.BasicBlock(4, 4, fused=True)
    block.bn2 = nn.BatchNorm2d(4, affine=False)
    with pytest.raises(ValueError, match="affine=False.*rk.convert fuses"):
        block(torch.randn(2, 4, 5, 5))


# -- what convert recognises, skips and reports -------------------------------

class _Tail(nn.Module):
    """conv -> bn -> (+ x) -> act, with the pieces the tests vary."""

    def __init__(self, act=None, norm=nn.BatchNorm2d, residual=True):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = norm(4)
        self.act = act or nn.ReLU()
        self.residual = residual

    def forward(self, x):
        out = self.bn(self.conv(x))
        return self.act(out + x if self.residual else out)


class _Untraceable(_Tail):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            x = x * 1.0
        return F.relu(self.bn(self.conv(x)) + x)


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's shape with a forward fx cannot trace: the structural fallback's case."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return super().forward(x)


class _TrainingBranch(_Tail):
    def forward(self, x):
        out = self.bn(self.conv(x)) + x
        return F.relu(out) if self.training else F.relu(out) * 1.0


def _report(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = rk.convert(model, return_report=True, **kwargs)
    return model, report, [str(w.message) for w in caught]


def test_report_names_what_it_fused_and_skipped_and_why():
    model = nn.Sequential(_Tail(), _Tail(act=nn.LeakyReLU()), _Untraceable(), _TrainingBranch(),
                          BasicBlock(4, 4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                                                          nn.ReLU()))
    reference = copy.deepcopy(model)
    model, report, warned = _report(model)
    assert not warned
    fused = {(f.bn, f.pattern, f.module, f.method.split(",")[0]) for f in report.fused}
    assert fused == {("0.bn", "bn -> add -> relu", "0", "fx"),
                     ("4.bn2", "bn -> add -> relu", "4", "structural")}, report
    skipped = {(s.where, s.what): s.reason for s in report.skipped}
    assert "non-ReLU activation (LeakyReLU)" in skipped["1.bn", "bn -> add -> LeakyReLU"]
    assert "not traceable" in skipped["2", "forward"]
    assert "self.training" in skipped["3", "forward"]
    assert "no residual" in skipped["5.1", "bn -> relu"]
    assert len(report.skipped) == 4
    text = str(report)
    assert "0.bn" in text and "4.bn2" in text and "LeakyReLU" in text
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm, reason", [
    (nn.BatchNorm3d, "5-D"), (nn.SyncBatchNorm, "SyncBatchNorm")])
def test_batch_norms_it_cannot_express_are_skipped_with_the_reason(norm, reason):
    model, report, warned = _report(_Tail(norm=norm))
    assert not report.fused and reason in report.skipped[0].reason
    assert warned and "fused nothing" in warned[0] and reason in warned[0]


def test_hooked_batch_norm_is_skipped():
    model = _Tail()
    model.bn.register_forward_hook(lambda *_: None)
    _, report, _ = _report(model)
    assert not report.fused and "hooks" in report.skipped[0].reason


def test_nothing_to_fuse_warns():
    with pytest.warns(UserWarning, match="fused nothing in Sequential"):
        rk.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@pytest.mark.parametrize("thing", ["resnet18", None, 3])
def test_convert_takes_a_module(thing):
    with pytest.raises(TypeError, match="convert takes an nn.Module"):
        rk.convert(thing)


def test_verbose_prints_the_report(capsys):
    rk.convert(_Tail(), verbose=True)
    assert "fused    bn: bn -> add -> relu [fx" in capsys.readouterr().out


# -- round trips ----------------------------------------------------------------

def test_round_trip_keeps_state_and_gives_the_original_back():
    torch.manual_seed(0)
    model = _randomise(tv_resnet.resnet50(num_classes=5, width=4))
    original = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert rk.convert(model) is model
    assert list(model.state_dict()) == list(before)
    assert [id(p) for p in model.parameters()] == params   # optimizers stay valid
    original.load_state_dict(model.state_dict())            # checkpoints load either way
    model.load_state_dict(before)
    model, report = rk.convert(model, fused=False, return_report=True)
    assert len(report.restored) == 16
    assert not any("forward" in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(2, 3, 32, 32)
    original.eval(), model.eval()
    assert torch.equal(model(x), original(x))


def test_copy_leaves_the_original_alone_and_converting_twice_is_once():
    model = tv_resnet.resnet18(num_classes=5, width=4)
    copied = rk.convert(model, inplace=False)
    assert copied is not model and not any("forward" in m.__dict__ for m in model.modules())
    _, report = rk.convert(copied, return_report=True)
    assert len(report.fused) == 8
    twin = copy.deepcopy(copied)  # a converted model deep-copies with its fused forwards
    assert twin.layer1[0].forward.__self__ is twin.layer1[0]


def test_own_blocks_are_switched_by_their_flag():
    model = rk.models.resfuse19(num_classes=10)
    _, report = rk.convert(model, return_report=True)
    blocks = [m for m in model.modules() if isinstance(m, rk.nn.FusableBlock)]
    assert blocks and all(m.fused for m in blocks)
    assert {f.method for f in report.fused} == {"own block"}
    rk.convert(model, fused=False)
    assert not any(m.fused for m in blocks)


def test_benchmark_measures_both_and_keeps_the_report():
    from resfuse_kernels.bench import convert as bench
    row = bench.measure(lambda: tv_resnet.resnet18(num_classes=5, width=4), torch.device("cpu"),
                        "fp32", batch=2, size=32, rounds_=1, warmup=1)
    assert row["fused"] == 8 and row["original"]["runs"] == row["converted"]["runs"] == 2
    assert row["ratio"] > 0 and "8 x bn -> add -> relu" in row["report"]
