"""The ``cpu`` backend: loads the C++ kernels (csrc/cpu) and exposes the
backend interface (see :mod:`resfuse_kernels.backends`).

Raises ImportError, with the reason, when the library is not built or this
CPU cannot run it, so that the backend is reported unavailable.
"""

from __future__ import annotations

import importlib.util

import torch

_spec = importlib.util.find_spec("resfuse_kernels._C_cpu")
if _spec is None or _spec.origin is None:
    raise ImportError("not built (setup.py builds it when a C++ compiler is found)")
if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    raise ImportError("built for AVX2, which this CPU lacks")
# A TORCH_LIBRARY, not a Python module: loading it registers resfuse_cpu::*.
torch.ops.load_library(_spec.origin)

_ops = torch.ops.resfuse_cpu
highway_gate_forward = _ops.highway_gate_forward
highway_gate_backward = _ops.highway_gate_backward
resfuse_tail_forward = _ops.resfuse_tail_forward
resfuse_tail_backward = _ops.resfuse_tail_backward
