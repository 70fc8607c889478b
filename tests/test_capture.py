"""CUDA-graph capturability of fused training (DESIGN.md section 5).

On any device: a fused training step (forward, loss, backward, NAG SGD
step) makes no host synchronisation, with every way a tensor reaches the
host patched to raise; per-step state (num_batches_tracked, momentum=None's
cumulative average, running statistics) stays on the device;
torch.compile(mode="reduce-overhead") trains a fused block as the oracle;
:class:`resfuse_kernels.graphs.GraphedStep` drives a step as the trainer
and the benchmarks use it. On a GPU: a captured and replayed fused
ResFuse-19 step matches the eager one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import resfuse_kernels as rk
from resfuse_kernels import graphs
from resfuse_kernels.train import recipe
from _cases import train_against_oracle
from conftest import DEVICE

# Every way a tensor's value reaches the host.
SYNCING_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__",
                   "__index__", "__array__", "nonzero")
SYNCING_FUNCTIONS = ("equal", "allclose", "is_nonzero", "nonzero", "unique", "masked_select")


class HostSync(AssertionError):
    pass


def _interpreter_dir() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return os.path.dirname(triton.__file__) + os.sep


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, a tensor's value read on the host raises
    :class:`HostSync`: the ``Tensor`` methods of :data:`SYNCING_METHODS`, the
    ``torch`` functions of :data:`SYNCING_FUNCTIONS`, ``.to("cpu")`` and
    ``torch.cuda.synchronize``. Calls made by Triton's interpreter itself
    (``TRITON_INTERPRET=1``: it stands for the GPU and reads device memory
    as numpy) are let through; calls from anything else, PyTorch included,
    raise."""
    interpreter = _interpreter_dir()

    def guard(name, original):
        def raiser(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if interpreter and caller.startswith(interpreter):
                return original(*args, **kwargs)
            raise HostSync(f"host synchronisation: {name} called from {caller}")
        return raiser

    def to(self, *args, **kwargs):
        targets = [*args, kwargs.get("device")]
        if any(str(t) == "cpu" or getattr(t, "type", None) == "cpu" for t in targets
               if isinstance(t, (str, torch.device))):
            return guard("Tensor.to('cpu')", original_to)(self, *args, **kwargs)
        return original_to(self, *args, **kwargs)

    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in SYNCING_METHODS]
    saved += [(torch, n, getattr(torch, n)) for n in SYNCING_FUNCTIONS]
    saved.append((torch.cuda, "synchronize", torch.cuda.synchronize))
    original_to = torch.Tensor.to
    try:
        for owner, name, original in saved:
            setattr(owner, name, guard(f"{getattr(owner, '__name__', owner)}.{name}", original))
        torch.Tensor.to = to
        yield
    finally:
        torch.Tensor.to = original_to
        for owner, name, original in saved:
            setattr(owner, name, original)


def test_no_host_sync_catches_every_way_to_the_host():
    """The guard is not blind: each kind of host read raises inside it, and
    everything is restored after it."""
    t = torch.ones(3, device=DEVICE)
    reads = [lambda: t.sum().item(), lambda: t.cpu(), lambda: t.tolist(),
             lambda: bool(t.sum() > 0), lambda: float(t.sum()), lambda: int(t[0]),
             lambda: range(10)[t[0].long()], lambda: t.to("cpu"),
             lambda: t.to(device=torch.device("cpu")), lambda: torch.equal(t, t),
             lambda: t.nonzero(), lambda: torch.unique(t)]
    with no_host_sync():
        for i, read in enumerate(reads):
            with pytest.raises(HostSync):
                read()
        t.to(torch.float64)  # not a host read
    assert t.sum().item() == 3.0 and bool(t.all())


def _train_steps(model, x, y, steps=2):
    opt = recipe.nag_sgd(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize("name", ["resfuse19", "highway19"])
def test_fused_training_step_makes_no_host_sync(backend, name):
    """Forward, loss, backward and two NAG SGD steps of a fused 19-layer
    network (the second uses the momentum buffers) with every host read
    patched to raise; the per-step state changed on the device."""
    model = rk.models.build(name, num_classes=10, fused=True).to(DEVICE).train()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 10, (2,), device=DEVICE)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_var.clone() for m in bns]
    with no_host_sync():
        loss = _train_steps(model, x, y)
    assert torch.isfinite(loss)
    assert all(m.num_batches_tracked.item() == 2 for m in bns)
    assert all(m.num_batches_tracked.device == x.device for m in bns)
    changed = sum(not torch.equal(b, m.running_var) for b, m in zip(before, bns))
    assert changed == len(bns)


@pytest.mark.parametrize("kind", ["highway", "resfuse"])
def test_cumulative_average_momentum_stays_on_device(backend, kind):
    """momentum=None (the cumulative average 1 / num_batches_tracked) in the
    BatchNorms of the fused ops: no host read, and the running statistics
    those of nn.BatchNorm2d's (the reference twin, run outside the guard:
    PyTorch's own BatchNorm reads num_batches_tracked on the host)."""
    block = rk.nn.HighwayBlock(6) if kind == "highway" else rk.nn.ResFuseBlock(6)
    block = block.to(DEVICE, torch.float64).train()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    fused = rk.convert(copy.deepcopy(block), fused=True)
    if kind == "resfuse":  # the pair's first BatchNorm is no fused op's: keep it PyTorch's 0.1
        block.bn1.momentum = fused.bn1.momentum = block.block1.bn1.momentum = 0.1
        fused.block1.bn1.momentum = 0.1
    for step in range(3):
        x = torch.randn(2, 6, 5, 5, device=DEVICE, dtype=torch.float64)
        block(x).sum().backward()
        with no_host_sync():
            fused(x).sum().backward()
    for (name, want), got in zip(block.named_buffers(), fused.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert all(m.num_batches_tracked.item() == 3 for m in fused.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_reduce_overhead_compile_trains_as_oracle():
    """torch.compile(mode="reduce-overhead") over a fused ResFuse pair, on the
    device's default backend: against the float64 oracle, two steps and
    eval (on a GPU the compiled steps replay CUDA graphs)."""
    torch._dynamo.reset()
    oracle = rk.nn.ResFuseBlock(5).to(DEVICE, torch.float64)
    train_against_oracle(
        oracle, lambda: torch.randn(3, 5, 6, 6, device=DEVICE, dtype=torch.float64),
        steps=2, wrap=lambda fused: torch.compile(fused, mode="reduce-overhead"))


# ---------------------------------------------------------------- GraphedStep


def _classifier(fused=True, seed=0):
    torch.manual_seed(seed)
    return rk.models.build("resfuse19", num_classes=5, fused=fused).to(DEVICE).train()


def _step_fn(model, opt):
    def train_step(x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss, logits
    return train_step


def _batches(n, batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g).to(DEVICE),
             torch.randint(0, 5, (batch,), generator=g).to(DEVICE)) for _ in range(n)]


def test_emulated_graphed_step_is_the_eager_step():
    """The graph driver's bookkeeping (static buffers, gradients set to None,
    the warm-up count, outputs) on a fused model, run eagerly: bit for bit
    the plain training loop's losses, weights and running statistics."""
    ref, emu = _classifier(), _classifier()
    opt_ref, opt_emu = (recipe.nag_sgd(m.parameters(), lr=0.05) for m in (ref, emu))
    step = graphs.GraphedStep(_step_fn(emu, opt_emu), opt_emu, warmup=1, emulate=True)
    plain = _step_fn(ref, opt_ref)
    for x, y in _batches(3):
        opt_ref.zero_grad(set_to_none=True)
        want, _ = plain(x, y)
        got, logits = step(x, y)
        assert logits.shape == (2, 5)
        assert torch.equal(got, want)
    assert step.calls == 3 and step.captures == 0 and step.mode == "emulated"
    for a, b in zip(ref.state_dict().values(), emu.state_dict().values()):
        assert torch.equal(a, b)


def test_graphed_step_argument_errors():
    model = _classifier(fused=False)
    opt = recipe.nag_sgd(model.parameters())
    with pytest.raises(TypeError, match="callable"):
        graphs.GraphedStep(None, opt)
    with pytest.raises(TypeError, match="Optimizer"):
        graphs.GraphedStep(_step_fn(model, opt), "sgd")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            graphs.GraphedStep(_step_fn(model, opt), opt, warmup=bad)
    step = graphs.GraphedStep(_step_fn(model, opt), opt, warmup=1, emulate=True)
    (x, y), = _batches(1)
    with pytest.raises(TypeError, match="tensors only"):
        step(x, 3)
    step(x, y)
    with pytest.raises(ValueError, match="fixed shapes"):
        step(x[:1], y[:1])
    with pytest.raises(ValueError, match="fixed shapes"):
        step(x.double(), y)
    with pytest.raises(ValueError, match="2 inputs"):
        step(x)
    bad = graphs.GraphedStep(lambda x: "loss", None, warmup=1, emulate=True)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        bad(x)


def test_graphed_step_refuses_a_cpu_device():
    step = graphs.GraphedStep(lambda x: x * 2, None)
    with pytest.raises(graphs.GraphUnavailable, match="CUDA graphs need a CUDA device"):
        step(torch.ones(2))
    assert "cpu" in graphs.unavailable_reason("cpu")


def test_hyperparameters_and_capturable():
    """What a capture bakes in (the lr a scheduler changes) and the
    optimizers that get capturable=True."""
    p = torch.nn.Parameter(torch.ones(2))
    sgd = recipe.nag_sgd([p], lr=0.1)
    before = graphs.hyperparameters(sgd)
    sgd.param_groups[0]["lr"] = 0.01
    assert graphs.hyperparameters(sgd) != before and ("lr", 0.01) in graphs.hyperparameters(sgd)[0]
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    adam.step()
    graphs.make_capturable(adam)
    assert adam.param_groups[0]["capturable"] is True
    graphs.make_capturable(sgd)
    assert "capturable" not in sgd.param_groups[0]


def test_autotuning_during_capture_is_refused(monkeypatch):
    """A Triton kernel meeting a new key during capture raises a clear error
    instead of benchmarking inside the capture (interpreter: a stand-in
    capture on CPU tensors)."""
    launch = pytest.importorskip("resfuse_kernels.triton._launch")
    remembered = next(iter(launch.TUNED.values()))
    tuning = launch.Remembered(remembered.tuner, [remembered.tuner.fn.arg_names[i]
                                                  for i in remembered._key_at],
                               remembered.configs_by_layout, benchmarks=True)
    monkeypatch.setattr(launch, "_capturing", lambda t: True)
    args = [torch.ones(1)] * (max(tuning._key_at) + 1)
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        tuning.run((1,), args, {})


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_captured_fused_resfuse19_step_matches_eager(channels_last):
    """A fused ResFuse-19 step captured after warm-up and replayed matches the
    eager steps: losses, weights and running statistics after six steps,
    with a learning-rate change (a new capture) after the fourth."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager, graphed = (_classifier().to(memory_format=fmt) for _ in range(2))
    opts = [recipe.nag_sgd(m.parameters(), lr=0.05) for m in (eager, graphed)]
    plain = _step_fn(eager, opts[0])
    step = graphs.GraphedStep(_step_fn(graphed, opts[1]), opts[1], warmup=2)
    for i, (x, y) in enumerate(_batches(6, batch=8, size=16)):
        x = x.contiguous(memory_format=fmt)
        if i == 4:
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.02
        opts[0].zero_grad(set_to_none=True)
        want, _ = plain(x, y)
        got, _ = step(x, y)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"loss of step {i}")
    assert step.captures == 2 and step.mode == "cuda-graph"
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
