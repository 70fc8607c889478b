"""Loss, top-k error, throughput and peak memory.

A :class:`Meter` keeps count-weighted sums on the device (no host
synchronisation per step); :meth:`Meter.reduce` adds them over the ranks, so
rank 0 reports the global figures however the images were divided.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor

from .distributed import Ranks, all_sum

TOPK = (1, 5)


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int] = TOPK) -> Tensor:
    """For each ``k`` of ``ks``, how many rows of ``logits`` (N, classes) have
    ``target`` among their ``k`` largest scores (``k`` capped at the number
    of classes), as a float64 tensor on ``logits``' device."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits (N, classes) and target (N,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :min(k, logits.shape[1])].any(dim=1).sum() for k in ks]).double()


class Meter:
    """Sums of loss x images, top-1 and top-5 hits and images, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2 + len(TOPK), dtype=torch.float64, device=device)

    def update(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """Add a batch: ``loss`` is its mean loss (a 0-dim tensor)."""
        n = target.shape[0]
        self.sums[0] += loss.detach().double() * n
        self.sums[1:1 + len(TOPK)] += topk_correct(logits.detach(), target)
        self.sums[-1] += n

    def state(self) -> list[float]:
        """The sums as plain floats (a checkpoint's partial epoch)."""
        return self.sums.tolist()

    def load(self, values: Sequence[float]) -> None:
        self.sums.copy_(torch.tensor(list(values), dtype=torch.float64))

    def reduce(self, ranks: Ranks) -> dict:
        """The global mean loss, top-1 and top-5 error (fractions) and image count."""
        sums = all_sum(self.sums.clone(), ranks).tolist()
        n = sums[-1]
        out = {"loss": sums[0] / n if n else float("nan"), "images": int(n)}
        for k, hits in zip(TOPK, sums[1:1 + len(TOPK)]):
            out[f"top{k}_err"] = 1 - hits / n if n else float("nan")
        return out


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; a CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[Optional[int], str]:
    """``(bytes, what was measured)``: CUDA's max_memory_allocated since the
    last reset, or on a CPU the process's peak resident set size since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak * (1 if sys.platform == "darwin" else 1024), "cpu peak RSS of the process"
