"""The torch.library.triton_op twins of the public ops (resfuse_triton::*).

They are what torch.compile traces into on a GPU. Here (any device) they are
checked eagerly against the float64 oracle, outputs and gradients. On a GPU they must also pass opcheck and be what a compiled
fused block runs.
"""

from __future__ import annotations

import pytest
import torch

import resfuse_kernels as rk
from _cases import HighwayCase, TailCase
from conftest import DEVICE, assert_close
from test_ops import _highway_op_args, _tail_op_args, loss_grad

triton_reason = rk.backends.unavailable_reason("triton", DEVICE.type)
pytestmark = pytest.mark.skipif(triton_reason is not None,
                                reason=f"triton backend: {triton_reason}")
ON_GPU = DEVICE.type == "cuda"


def _twin(name):
    return getattr(torch.ops.resfuse_triton, name).default


def _check_twin(case, name, args):
    """The twin of ``torch.ops.resfuse.<name>`` (through its own schema,
    argument binding and autograd registration, on the Triton backend)
    against the float64 oracle: output and the gradients of every input of
    ``case``, under the suite's rule (conftest.RULE)."""
    y_ref, ref_inputs, _ = case.reference()
    y_pt, pt_inputs, _ = case.reference(torch.float32)
    with rk.backends.use("triton"):
        y = _twin(name)(*args)[0]
        gy = loss_grad(case, y_ref, y_pt, torch.float32)
        grads = torch.autograd.grad(y, case.inputs(), gy)
    assert_close(y, y_ref, torch.float32, f"{name} output", y_pt)
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, gy.double())
    pt_grads = torch.autograd.grad(y_pt, pt_inputs, gy)
    for i, (g, r, p) in enumerate(zip(grads, ref_grads, pt_grads)):
        assert_close(g, r, torch.float32, f"{name} gradient {i}", p)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_highway_twin_matches_oracle(training):
    case = HighwayCase.random((3, 6, 5, 4), torch.float32, "channels_last", training)
    _check_twin(case, "highway_gate", _highway_op_args(case))


@pytest.mark.parametrize("carry", [False, True], ids=["no-carry", "carry"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tail_twin_matches_oracle(training, carry):
    case = TailCase.random((3, 6, 5, 4), torch.float32, "nchw", training,
                           carry_channels=5 if carry else None)
    _check_twin(case, "resfuse_tail", _tail_op_args(case))


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
