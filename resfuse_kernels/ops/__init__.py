"""The fused ops, registered as ``torch.ops.resfuse.*``.

Each op is declared once with ``torch.library.custom_op`` (schema, fake
implementation, autograd) and runs on the backend that
:mod:`resfuse_kernels.backends` picks for the tensors' device. The functions
here are the friendly entry points: they also fold the batch statistics into
the running ones, as ``F.batch_norm`` does.
"""

from .highway_gate import highway_gate
from .resfuse_tail import resfuse_tail

__all__ = ["highway_gate", "resfuse_tail"]
