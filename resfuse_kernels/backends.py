"""Which implementation runs a fused op.

Every fused op has one schema (``torch.ops.resfuse.*``) and several
implementations, the *backends*:

========  ==============================================  ============
name      what                                            devices
========  ==============================================  ============
triton    Triton kernels (``resfuse_kernels.triton``)     cuda; cpu with
                                                          TRITON_INTERPRET=1
cuda      CUDA C++ kernels from ``csrc/``                 cuda
cpu       C++ kernels from ``csrc/``                      cpu
torch     a composite of PyTorch ops (the formula)        any
========  ==============================================  ============

By default the first usable backend of the tensor's device is taken
(:data:`PREFERENCE`); ``RESFUSE_BACKEND=name`` in the environment, or
:func:`use`, forces one, and forcing one that cannot run is an error that
says why. A backend is a module exposing ``<op>_forward`` and
``<op>_backward`` for every op name in :data:`OPS`.

The ``resfuse::*`` ops are opaque to torch.compile. On CUDA tensors with
the Triton backend, the public entry points call the ops' ``triton_op``
twins ``resfuse_triton::*`` instead (:func:`traceable_op`), whose kernels
torch.compile traces into.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator

import torch

NAMES = ("triton", "cuda", "cpu", "torch")
OPS = ("highway_gate", "resfuse_tail")

# Best first, per device type.
PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

_MODULES = {
    "torch": "resfuse_kernels.ops.composite",
    "triton": "resfuse_kernels.triton",
    "cuda": "resfuse_kernels._ext_cuda",
    "cpu": "resfuse_kernels._ext_cpu",
}

_forced: str | None = None
_loaded: dict[str, ModuleType | str] = {}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here."""


def _load(name: str) -> ModuleType | str:
    """The backend's module, or a one-line reason why it cannot be loaded."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # not built / not installed
            _loaded[name] = f"not available: {exc}"
        else:
            missing = [f"{op}_{d}" for op in OPS for d in ("forward", "backward")
                       if not hasattr(module, f"{op}_{d}")]
            _loaded[name] = (f"not available: {_MODULES[name]} lacks {', '.join(missing)}"
                             if missing else module)
    return _loaded[name]


def _devices(name: str) -> tuple[str, ...]:
    if name == "torch":
        return ("cpu", "cuda")
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return ("cpu", "cuda") if interpret else ("cuda",)
    return (name,)


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None when backend ``name`` can run (on ``device_type`` if given), else why not."""
    if name not in NAMES:
        return f"unknown backend {name!r}; choose one of {', '.join(NAMES)}"
    if device_type is not None and device_type not in _devices(name):
        return f"runs on {' and '.join(_devices(name))} tensors, not {device_type}"
    loaded = _load(name)
    return loaded if isinstance(loaded, str) else None


def status() -> dict[str, str | None]:
    """Every backend mapped to None (usable) or the reason it is not."""
    return {name: unavailable_reason(name) for name in NAMES}


def forced() -> str | None:
    """The backend forced by :func:`use` or ``RESFUSE_BACKEND``, if any."""
    return _forced or os.environ.get("RESFUSE_BACKEND") or None


def resolve(device: torch.device) -> str:
    """The name of the backend that runs ops on ``device``."""
    name = forced()
    if name is not None:
        reason = unavailable_reason(name, device.type)
        if reason is not None:
            raise BackendUnavailable(f"resfuse backend {name!r} {reason}")
        return name
    for name in PREFERENCE.get(device.type, ("torch",)):
        if unavailable_reason(name, device.type) is None:
            return name
    raise BackendUnavailable(f"no resfuse backend runs on {device.type} tensors")


def kernels(device: torch.device) -> ModuleType:
    """The backend module that runs ops on ``device``."""
    module = _load(resolve(device))
    assert not isinstance(module, str)
    return module


@torch.compiler.assume_constant_result
def _traceable_name(op: str, device_type: str) -> str:
    """The name of ``op``'s traceable Triton twin for ``device_type`` tensors,
    or "" (torch.compile calls this once while tracing and keeps the answer:
    changing the backend later needs ``torch._dynamo.reset()``).
    ``RESFUSE_TRITON_TRACEABLE=0`` keeps the opaque ops everywhere."""
    if os.environ.get("RESFUSE_TRITON_TRACEABLE", "1") == "0":
        return ""
    if device_type != "cuda" or resolve(torch.device(device_type)) != "triton":
        return ""
    module = _load("triton")
    if isinstance(module, str) or module.INTERPRET:
        return ""
    return op


def traceable_op(op: str, device_type: str):
    """The ``torch.library.triton_op`` twin of public op ``op``
    (``torch.ops.resfuse_triton.<op>``: same schema and autograd, but
    torch.compile traces into its Triton kernels) when ``device_type`` tensors
    run on the compiled Triton backend; None otherwise, and the public
    opaque ``torch.ops.resfuse.<op>`` runs."""
    name = _traceable_name(op, device_type)
    return getattr(torch.ops.resfuse_triton, name) if name else None


@contextlib.contextmanager
def use(name: str | None) -> Iterator[None]:
    """Force backend ``name`` inside the ``with`` block.

    ``None`` lifts an outer :func:`use`: ``RESFUSE_BACKEND``, if set, or the
    device's default applies again.

    Raises :class:`BackendUnavailable` at once if the backend cannot load.
    """
    global _forced
    if name is not None:
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailable(f"resfuse backend {name!r} {reason}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous
