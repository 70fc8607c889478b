"""torch.compile(fullgraph=True) over fused blocks: one graph, eager's numbers."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import resfuse_kernels as rk
from _cases import train_against_oracle
from conftest import DEVICE


def _block(kind):
    return {
        "basic-down": lambda: rk.nn.BasicBlock(4, 6, stride=2),
        "highway": lambda: rk.nn.HighwayBlock(5),
        "resfuse": lambda: rk.nn.ResFuseBlock(5),
    }[kind]()


def _check_compiled(kind, backend_name):
    """The compiled fused block trains as the reference does: against the
    float64 oracle under the suite's rule, two steps and eval, channels_last."""
    oracle = _block(kind).to(DEVICE, torch.float64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend_name)
    in_channels = 4 if kind == "basic-down" else 5
    train_against_oracle(
        oracle, lambda: torch.randn(3, in_channels, 6, 6, device=DEVICE, dtype=torch.float64
                                    ).to(memory_format=torch.channels_last),
        steps=2, wrap=lambda fused: torch.compile(fused, fullgraph=True, backend=counter))
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
