"""torch.compile(fullgraph=True) over fused blocks: one graph, eager's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

import resfuse_kernels as rk
from conftest import DEVICE, assert_close


def _blocks():
    return {
        "basic-down": rk.nn.BasicBlock(4, 6, stride=2, fused=True),
        "highway": rk.nn.HighwayBlock(5, fused=True),
        "resfuse": rk.nn.ResFuseBlock(5, fused=True),
    }


def _train_step(model, x):
    model.train()
    out = model(x)
    out.square().mean().backward()
    return out, [p.grad.clone() for p in model.parameters()]


def _check_compiled(kind, backend_name):
    eager = _blocks()[kind].to(DEVICE)
    compiled_module = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend_name)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=counter)
    x = torch.randn(3, eager.conv1.in_channels if kind != "highway" else 5, 6, 6,
                    device=DEVICE).to(memory_format=torch.channels_last)
    for step in range(2):
        want, want_grads = _train_step(eager, x)
        got, got_grads = _train_step(compiled, x)
        assert_close(got, want, torch.float32, f"step {step} output")
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, torch.float32, f"step {step} gradient")
        for (name, b), c in zip(eager.named_buffers(), compiled_module.buffers()):
            assert_close(c, b, torch.float32, f"step {step} buffer {name}")
        for m in (eager, compiled_module):
            m.zero_grad()
    eager.eval()
    compiled_module.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), torch.float32, "eval output")
    assert counter.frame_count >= 1


@pytest.mark.parametrize("kind", ["basic-down", "highway", "resfuse"])
def test_fullgraph_aot_eager(backend, kind):
    """Dynamo + AOTAutograd: the fake and autograd registrations, no graph break."""
    torch._dynamo.reset()
    _check_compiled(kind, "aot_eager")


def test_fullgraph_inductor(backend):
    """The real compiler over the block with the most fused ops."""
    torch._dynamo.reset()
    _check_compiled("resfuse", "inductor")
