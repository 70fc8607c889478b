"""The Triton kernels as ``torch.library.triton_op``\\ s, which torch.compile
traces into (Inductor sees the kernels and the torch ops around them)
instead of calling an opaque op.

``resfuse_triton::highway_gate`` and ``resfuse_triton::resfuse_tail`` (and
their ``_backward``\\ s) have exactly the schemas, checks, outputs and
autograd of the public ``resfuse::*`` ops: the schema is taken from the
public op's implementation and the autograd formula is registered by the
same function. :func:`resfuse_kernels.backends.traceable_op` routes the
public entry points (:func:`resfuse_kernels.ops.highway_gate`,
:func:`~resfuse_kernels.ops.resfuse_tail`) here for CUDA tensors on the
Triton backend.

Under ``TRITON_INTERPRET=1`` the ops still run eagerly, but torch.compile
cannot trace the interpreter's kernels, so the public entry points keep the
opaque ``resfuse::*`` ops there.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable

from torch.library import triton_op

from ..ops import _common
from ..ops import highway_gate as _highway_api
from ..ops import resfuse_tail as _tail_api
from . import highway_gate as _highway_kernels
from . import resfuse_tail as _tail_kernels

NAMESPACE = "resfuse_triton"


def _op(name: str, schema_of: Callable, check: Callable | None, run: Callable):
    """A triton_op ``NAMESPACE::name`` with ``schema_of``'s signature that
    runs ``check`` then ``run`` (a launcher of the Triton backend)."""

    signature = inspect.signature(schema_of, eval_str=True)

    def impl(*args, **kwargs):
        args = signature.bind(*args, **kwargs).args
        if check is not None:
            check(*args)
        # As the opaque ops: internal products keep the op's precision.
        with _common.no_autocast(args[0]):
            return run(*args)

    impl.__signature__ = signature
    impl.__name__ = name
    return triton_op(f"{NAMESPACE}::{name}", impl, mutates_args=())


# (``..ops.highway_gate`` the function shadows the module in ``..ops``.)
_highway = sys.modules[_highway_api.__module__]
_tail = sys.modules[_tail_api.__module__]

highway_gate = _op("highway_gate", _highway.forward_impl, _highway.check,
                   _highway_kernels.highway_gate_forward)
highway_gate_backward = _op("highway_gate_backward", _highway.backward_impl, None,
                            _highway_kernels.highway_gate_backward)
_highway.register_autograd(highway_gate, highway_gate_backward)

resfuse_tail = _op("resfuse_tail", _tail.forward_impl, _tail.check,
                   _tail_kernels.resfuse_tail_forward)
resfuse_tail_backward = _op("resfuse_tail_backward", _tail.backward_impl, None,
                            _tail_kernels.resfuse_tail_backward)
_tail.register_autograd(resfuse_tail, resfuse_tail_backward)

OPS = {"highway_gate": highway_gate, "resfuse_tail": resfuse_tail}
