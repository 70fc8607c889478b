"""The ``cuda`` backend: loads the CUDA kernels (csrc/cuda) and exposes the
backend interface (see :mod:`resfuse_kernels.backends`).

Raises ImportError, with the reason in one line, when the library is not
built, torch has no CUDA, no CUDA device is visible, the library cannot be
loaded or holds no code for this GPU's architecture (setup.py builds sm_90
plus compute_90 PTX unless TORCH_CUDA_ARCH_LIST says otherwise), so that
the backend is reported unavailable.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _build

_spec = importlib.util.find_spec("resfuse_kernels._C_cuda")
if _spec is None or _spec.origin is None:
    raise ImportError(_build.missing_reason("cuda"))
if torch.version.cuda is None:
    raise ImportError(f"this torch ({torch.__version__}) is a build without CUDA")
if not torch.cuda.is_available():
    raise ImportError("no CUDA device is visible")
try:
    # A TORCH_LIBRARY, not a Python module: loading it registers resfuse_cuda::*.
    torch.ops.load_library(_spec.origin)
except OSError as exc:  # e.g. built against another torch or CUDA runtime
    raise ImportError(_build.load_failure_reason(_spec.origin, exc)) from exc

_ops = torch.ops.resfuse_cuda
if not _ops.kernels_runnable():
    _major, _minor = torch.cuda.get_device_capability()
    raise ImportError(f"built without code for this GPU (sm_{_major}{_minor}); rebuild with "
                      f"TORCH_CUDA_ARCH_LIST={_major}.{_minor}")
highway_gate_forward = _ops.highway_gate_forward
highway_gate_backward = _ops.highway_gate_backward
resfuse_tail_forward = _ops.resfuse_tail_forward
resfuse_tail_backward = _ops.resfuse_tail_backward
