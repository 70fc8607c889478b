"""A dependency-free progress bar for a terminal, silent anywhere else."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


class Bar:
    """``desc  12/390 [=====>    ] 3.1 it/s  <info>`` redrawn in place on a TTY.

    Disabled (every call a no-op) when ``enabled`` is false or ``stream`` is
    not a terminal, so logs and CI output stay clean. ``info`` is called only
    when the line is redrawn (at most ``every`` seconds): a loss read there
    costs one device synchronisation per redraw, not one per step.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True,
                 stream: Optional[TextIO] = None, every: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.desc, self.every = total, desc, every
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int = 1, info: Optional[Callable[[], str]] = None) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(now - self.start, 1e-9)
        line = (f"\r{self.desc} {self.done}/{self.total} [{'=' * filled}"
                f"{'>' if filled < width else ''}{' ' * max(width - filled - 1, 0)}] "
                f"{rate:.2f} it/s" + (f"  {info()}" if info else ""))
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
