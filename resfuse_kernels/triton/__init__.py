"""The ``triton`` backend: Triton kernels for the fused ops.

Exposes the backend interface of :mod:`resfuse_kernels.backends` with the
signatures and semantics of :mod:`resfuse_kernels.ops.composite`. Importing
this package raises ImportError when Triton is missing, which the backend
registry reports as "not available"; ``import resfuse_kernels`` never
imports it eagerly. On CPU tensors the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # a broken install must read as "unavailable", too
    raise ImportError(f"Triton cannot be imported ({exc})") from exc

from . import traceable  # registers the torch.ops.resfuse_triton.* twins
from ._launch import INTERPRET
from .highway_gate import highway_gate_backward, highway_gate_forward
from .resfuse_tail import resfuse_tail_backward, resfuse_tail_forward

__all__ = ["INTERPRET", "traceable", "highway_gate_forward", "highway_gate_backward",
           "resfuse_tail_forward", "resfuse_tail_backward"]
