"""``python -m resfuse_kernels.info``: versions, devices and usable backends."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import __version__, backends


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, never fail
        return f"import failed: {exc}"


def report() -> str:
    """The report as text."""
    lines = [
        f"resfuse_kernels {__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton          {_version('triton')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"device cuda:{i}     {torch.cuda.get_device_name(i)}")
    else:
        lines.append("device          cpu only (no CUDA device)")
    forced = backends.forced()
    lines.append(f"forced backend  {forced or 'none (chosen by device)'}")
    lines.append("backends:")
    for name, reason in backends.status().items():
        lines.append(f"  {name:7s} {'usable' if reason is None else reason}")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        try:
            chosen = backends.resolve(torch.device(device))
        except backends.BackendUnavailable as exc:
            chosen = f"none: {exc}"
        lines.append(f"{device} tensors run on: {chosen}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
