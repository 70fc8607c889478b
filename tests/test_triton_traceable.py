"""The torch.library.triton_op twins of the public ops (resfuse_triton::*).

They are what torch.compile traces into on a GPU. Here (any device) they are
checked eagerly against the public ops: same schema, same outputs, same
gradients. On a GPU they must also pass opcheck and be what a compiled
fused block runs.
"""

from __future__ import annotations

import pytest
import torch

import resfuse_kernels as rk
from _cases import HighwayCase, TailCase
from conftest import DEVICE, assert_close
from test_ops import _highway_op_args, _tail_op_args

triton_reason = rk.backends.unavailable_reason("triton", DEVICE.type)
pytestmark = pytest.mark.skipif(triton_reason is not None,
                                reason=f"triton backend: {triton_reason}")
ON_GPU = DEVICE.type == "cuda"


def _twin(name):
    return getattr(torch.ops.resfuse_triton, name).default


@pytest.mark.parametrize("name", ["highway_gate", "highway_gate_backward", "resfuse_tail",
                                  "resfuse_tail_backward"])
def test_twin_has_the_public_schema(name):
    public = str(getattr(torch.ops.resfuse, name).default._schema)
    assert str(_twin(name)._schema) == public.replace("resfuse::", "resfuse_triton::", 1)


def _check_twin(name, args, differentiable):
    """The twin of ``torch.ops.resfuse.<name>`` gives the public op's outputs
    and the gradients of the arguments at ``differentiable`` (the Triton
    backend runs both)."""
    args = list(args)
    index = [i for i in differentiable if isinstance(args[i], torch.Tensor)]
    leaves = [args[i].detach().requires_grad_() for i in index]
    for i, leaf in zip(index, leaves):
        args[i] = leaf
    with rk.backends.use("triton"):
        public = getattr(torch.ops.resfuse, name)(*args)
        g = torch.randn(public[0].shape, device=DEVICE)
        want = torch.autograd.grad(public[0], leaves, g)
        twin = _twin(name)(*args)
        got = torch.autograd.grad(twin[0], leaves, g)
    for what, outs, refs in (("forward", twin, public), ("gradient", got, want)):
        for i, (t, p) in enumerate(zip(outs, refs)):
            assert_close(t, p, torch.float32, f"{name} {what} output {i}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_highway_twin_matches_public_op(training):
    case = HighwayCase.random((3, 6, 5, 4), torch.float32, "channels_last", training)
    _check_twin("highway_gate", _highway_op_args(case), (0, 1, 2, 3, 4, 7, 8))


@pytest.mark.parametrize("carry", [False, True], ids=["no-carry", "carry"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tail_twin_matches_public_op(training, carry):
    case = TailCase.random((3, 6, 5, 4), torch.float32, "nchw", training,
                           carry_channels=5 if carry else None)
    _check_twin("resfuse_tail", _tail_op_args(case), (0, 1, 2, 3, 6, 7, 8, 9))


def test_public_entry_points_route_to_the_twins_only_on_compiled_triton():
    with rk.backends.use("triton"):
        routed = rk.backends.traceable_op("resfuse_tail", DEVICE.type)
        if ON_GPU and not rk.triton.INTERPRET:
            assert routed is torch.ops.resfuse_triton.resfuse_tail
        else:  # the interpreter's kernels cannot be traced by torch.compile
            assert routed is None
    with rk.backends.use("torch"):
        assert rk.backends.traceable_op("resfuse_tail", DEVICE.type) is None


@pytest.mark.skipif(not ON_GPU, reason="tracing Triton kernels needs a GPU (the "
                    "interpreter's kernels cannot run on fake tensors)")
def test_twins_pass_opcheck_on_gpu():
    case = TailCase.random((2, 5, 3, 3), torch.float32, "channels_last", True, carry_channels=6)
    torch.library.opcheck(_twin("resfuse_tail"), _tail_op_args(case))
    hcase = HighwayCase.random((2, 5, 3, 3), torch.float32, "nchw", True)
    torch.library.opcheck(_twin("highway_gate"), _highway_op_args(hcase))
