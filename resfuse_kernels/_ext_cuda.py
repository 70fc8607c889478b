"""The ``cuda`` backend: loads the CUDA kernels (csrc/cuda) and exposes the
backend interface (see :mod:`resfuse_kernels.backends`).

Raises ImportError, with the reason in one line, when the library is not
built, torch has no CUDA, no CUDA device is visible or the library cannot be
loaded, so that the backend is reported unavailable.
"""

from __future__ import annotations

import importlib.util

import torch

_spec = importlib.util.find_spec("resfuse_kernels._C_cuda")
if _spec is None or _spec.origin is None:
    raise ImportError("not built (setup.py builds it when torch has CUDA and nvcc is found)")
if torch.version.cuda is None:
    raise ImportError(f"this torch ({torch.__version__}) is a build without CUDA")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is visible")
try:
    # A TORCH_LIBRARY, not a Python module: loading it registers resfuse_cuda::*.
    torch.ops.load_library(_spec.origin)
except OSError as exc:  # e.g. built against another torch or CUDA runtime
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
    raise ImportError(f"cannot load {_spec.origin}: {first_line}") from exc

_ops = torch.ops.resfuse_cuda
highway_gate_forward = _ops.highway_gate_forward
highway_gate_backward = _ops.highway_gate_backward
resfuse_tail_forward = _ops.resfuse_tail_forward
resfuse_tail_backward = _ops.resfuse_tail_backward
