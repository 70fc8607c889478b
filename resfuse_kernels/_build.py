"""What the install built, and the real reason when a compiled backend is
missing (read by the loaders ``_ext_cpu``/``_ext_cuda`` and so by
``python -m resfuse_kernels.info``).

setup.py writes ``_build_info.json`` next to the libraries it built: the
torch they were built against and, per backend, why it was not built.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
INFO = os.path.join(HERE, "_build_info.json")


def build_info() -> Optional[dict]:
    """The install's build record, or None if setup.py never built here."""
    try:
        with open(INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def install_command() -> str:
    """The command that builds the compiled backends for this copy."""
    root = os.path.dirname(HERE)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return f"pip install --no-build-isolation -e {root}"   # a source checkout
    return "pip install --no-build-isolation <resfuse-kernels source>"


def installed_elsewhere() -> Optional[str]:
    """Where pip installed this package, when this import is another copy (a
    source checkout that Python found first, e.g. the current directory)."""
    import importlib.metadata
    # Every install record on sys.path: a checkout holds one too (pip's in-tree
    # build leaves resfuse_kernels.egg-info beside the source).
    for dist in importlib.metadata.distributions(name="resfuse-kernels"):
        where = str(dist.locate_file("resfuse_kernels"))
        if os.path.isdir(where) and os.path.realpath(where) != os.path.realpath(HERE):
            return where
    return None


def missing_reason(backend: str) -> str:
    """Why the ``backend`` library ('cpu' or 'cuda') is absent, with what to run."""
    info = build_info()
    other = installed_elsewhere()
    if info is None and other is not None:
        return (f"not built in {HERE}, the copy Python imported (a source checkout found "
                f"first on sys.path, e.g. the current directory); the installed copy is "
                f"{other}: run from another directory, or install in place with "
                f"{install_command()}")
    if info is None:
        return (f"not built: this copy was installed without compiling csrc/ (by pip's build "
                f"isolation, RESFUSE_SKIP_EXT=1, or not installed at all); to build it: "
                f"{install_command()}")
    recorded = (info.get("reasons") or {}).get(backend)
    if recorded:
        return recorded
    return (f"not built: the install (torch {info.get('torch')}) left no library for it; "
            f"to rebuild: {install_command()}")


def load_failure_reason(origin: str, exc: BaseException) -> str:
    """Why a built library does not load, naming a torch mismatch when there is one."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    info = build_info()
    built = info.get("torch") if info else None
    if built and built != torch.__version__:
        return (f"built against torch {built} but this is torch {torch.__version__} "
                f"({first}); rebuild: {install_command()}")
    return f"cannot load {origin}: {first}"
