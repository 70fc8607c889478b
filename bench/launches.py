"""Stand-ins for the Triton backend's kernel launches (bench tools only).

The Triton modules launch every kernel as ``launch(kernel, grid, *args,
**kwargs)`` (:func:`resfuse_kernels.triton._launch.launch`); inside
:func:`launches_replaced` each such launch calls a function of the tool's
instead, which may time the real launch, skip it, or only record it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def launches_replaced(on_launch: Callable) -> Iterator[None]:
    """Every Triton launch of the backend inside the block calls
    ``on_launch(kernel, grid, args, kwargs)`` instead (``kernel`` as the
    module defines it: a ``JITFunction`` or an ``Autotuner``)."""
    import resfuse_kernels.triton._launch as launch_mod
    import resfuse_kernels.triton.highway_gate as hg
    import resfuse_kernels.triton.resfuse_tail as rt
    modules = (launch_mod, hg, rt)
    saved = [m.launch for m in modules]
    for m in modules:
        m.launch = lambda kernel, grid, *args, **kwargs: on_launch(kernel, grid, args, kwargs)
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.launch = original


def kernel_name(kernel) -> str:
    """The Python name of a ``JITFunction`` or of the one an ``Autotuner`` wraps."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", str(kernel))
