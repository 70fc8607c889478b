"""Training the paper's networks, on one process or many (``torchrun``).

``python -m resfuse_kernels.train`` (or ``resfuse-train``); see
docs/training.md. Modules: :mod:`.config` (settings and command line),
:mod:`.recipe` (the paper's optimizer and schedules), :mod:`.data` (datasets,
split, seeded order and augmentation), :mod:`.loop` (the trainer),
:mod:`.checkpoint`, :mod:`.metrics`, :mod:`.distributed`, :mod:`.sync_bn`,
:mod:`.report` (logs, Table 2, Figure 4), :mod:`.cli`.

Importing this package is cheap: the trainer's modules load on use.
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``python -m resfuse_kernels.train``)."""
    from .cli import main as cli_main
    return cli_main(argv)


__all__ = ["main"]
