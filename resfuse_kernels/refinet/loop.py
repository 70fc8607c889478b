"""RefiNet's small training loop: Adam on cross-entropy, progress lines.

Self-contained on purpose: the package's trainer (``resfuse_kernels.train``)
is written in parallel, and this module is the one place to swap for it.
The paper trains every level with Adam, default betas, its own learning
rate (section 5.2.1). Images stay uint8 in memory; a batch is converted
when it is used (:func:`~resfuse_kernels.data.normalize`).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..data import normalize


class Progress:
    """A progress bar on a terminal, a line every ~10 % elsewhere (logs)."""

    def __init__(self, desc: str, total: int, stream=None) -> None:
        self.desc, self.total, self.done = desc, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.next_line = time.perf_counter(), 0.1

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        share = self.done / self.total
        if self.tty:
            bar = "#" * int(30 * share)
            self.stream.write(f"\r{self.desc} [{bar:<30}] {self.done}/{self.total} {note}")
            if self.done >= self.total:
                self.stream.write("\n")
        elif share >= self.next_line or self.done >= self.total:
            self.stream.write(f"{self.desc}: {self.done}/{self.total} "
                              f"({time.perf_counter() - self.start:.1f} s) {note}\n")
            self.next_line = share + 0.1
        self.stream.flush()


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Index batches over ``range(n)``: shuffled when ``generator`` is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def fit(forward: Callable[[Tensor], Tensor], params: Iterable[nn.Parameter],
        modules: Sequence[nn.Module], images: Tensor, labels: Tensor, *, epochs: int,
        lr: float, batch_size: int = 64, seed: int = 0, desc: str = "train") -> list[float]:
    """Train ``params`` so that ``forward(normalized images)`` (logits)
    predicts ``labels``; returns the mean loss of each epoch.

    ``modules`` are put in train() mode for the run and eval() after it
    (the caller keeps frozen parts in eval()). Seeded: the same call gives
    the same parameters.
    """
    if images.shape[0] != labels.shape[0] or not labels.numel():
        raise ValueError(f"{images.shape[0]} images for {labels.shape[0]} labels")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    losses = []
    for epoch in range(epochs):
        progress = Progress(f"{desc} epoch {epoch + 1}/{epochs}", labels.numel())
        total = 0.0
        for index in batches(labels.numel(), batch_size, generator):
            loss = nn.functional.cross_entropy(forward(normalize(images[index])), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * index.numel()
            progress.update(index.numel(), f"loss {loss.item():.3f}")
        losses.append(total / labels.numel())
    for m in modules:
        m.eval()
    return losses


@torch.no_grad()
def predict(forward: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 256,
            desc: str | None = None) -> Tensor:
    """``forward`` over ``images`` (uint8) in batches, outputs concatenated."""
    # Progress only where it takes a while (more than a few batches).
    shown = desc and images.shape[0] > 4 * batch_size
    progress = Progress(desc, images.shape[0]) if shown else None
    outputs = []
    for index in batches(images.shape[0], batch_size):
        outputs.append(forward(normalize(images[index])))
        if progress:
            progress.update(index.numel())
    return torch.cat(outputs)
