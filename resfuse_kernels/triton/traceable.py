"""The Triton kernels as ``torch.library.triton_op``\\ s, which torch.compile
traces into (Inductor sees the kernels and the torch ops around them)
instead of calling an opaque op.

``resfuse_triton::highway_gate`` and ``resfuse_triton::resfuse_tail`` (and
their ``_backward``\\ s) have exactly the schemas, checks, outputs and
autograd of the public ``resfuse::*`` ops: :meth:`FusedOp.define_twin
<resfuse_kernels.ops._define.FusedOp.define_twin>` derives them from the
same definition. :func:`resfuse_kernels.backends.traceable_op` routes the
public entry points' traced calls here for CUDA tensors on the Triton
backend.

Under ``TRITON_INTERPRET=1`` the ops still run eagerly, but torch.compile
cannot trace the interpreter's kernels, so the public entry points keep the
opaque ``resfuse::*`` ops there.
"""

from __future__ import annotations

import sys

from ..ops import highway_gate as _highway_api
from ..ops import resfuse_tail as _tail_api
from . import highway_gate as _highway_launchers
from . import resfuse_tail as _tail_launchers

NAMESPACE = "resfuse_triton"

# (``..ops.highway_gate`` the function shadows the module in ``..ops``.)
_highway = sys.modules[_highway_api.__module__].OP
_tail = sys.modules[_tail_api.__module__].OP

highway_gate = _highway.define_twin(NAMESPACE, _highway_launchers)
resfuse_tail = _tail.define_twin(NAMESPACE, _tail_launchers)
