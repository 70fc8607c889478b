"""The ``cpu`` backend: loads the C++ kernels (csrc/cpu) and exposes the
backend interface (see :mod:`resfuse_kernels.backends`).

Raises ImportError with the real reason, and what to run, when the library
is not built, was built against another torch, does not load, or this CPU
cannot run it, so that the backend is reported unavailable.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _build

_spec = importlib.util.find_spec("resfuse_kernels._C_cpu")
if _spec is None or _spec.origin is None:
    raise ImportError(_build.missing_reason("cpu"))
if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    raise ImportError("built for AVX2, which this CPU lacks "
                      f"(torch reports {torch.backends.cpu.get_cpu_capability()})")
try:
    # A TORCH_LIBRARY, not a Python module: loading it registers resfuse_cpu::*.
    torch.ops.load_library(_spec.origin)
except OSError as exc:
    raise ImportError(_build.load_failure_reason(_spec.origin, exc)) from exc

_ops = torch.ops.resfuse_cpu
highway_gate_forward = _ops.highway_gate_forward
highway_gate_backward = _ops.highway_gate_backward
resfuse_tail_forward = _ops.resfuse_tail_forward
resfuse_tail_backward = _ops.resfuse_tail_backward
